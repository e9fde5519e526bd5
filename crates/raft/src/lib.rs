//! Replication of shards: every shard is an openraft group whose replicas live
//! on different nodes of the shard's region.
//!
//! - [`types`]: the Raft type configuration (an entry is one client batch).
//! - [`log_store`]: the Raft log, vote and purge mark on sled.
//! - [`state_machine`] and [`snapshot`]: the shard engine as the state machine;
//!   snapshots as streamed, digest-checked files, region-checked on install.
//!
//! - [`network`], [`server`]: node-to-node gRPC (`sovra.raft.v1`), one pooled
//!   channel per peer, an address book, bounded AppendEntries.
//! - [`auth`]: the cluster secret every node-to-node request carries.
//! - [`fault`]: drop/delay/partition/isolate rules in a tower layer, for tests.
//! - [`host`]: a node's replicas of many groups: writes to the leader
//!   (forwarded if needed), read levels, the watchdog, per-group metrics.
//!
//! Depends on `sovra-shard` (the engine) and `sovra-proto` (the node-to-node
//! messages); nothing here knows the public API.

// openraft's StorageError is large and its traits return it: boxing only here
// would not make anything smaller.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod fault;
pub mod host;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod server;
pub mod snapshot;
pub mod state_machine;
pub mod types;

pub use auth::ClusterSecret;
pub use fault::{Faults, Rule};
pub use host::{RaftHost, RaftSettings, ReadLevel, WriteAck};
pub use log_store::LogStore;
pub use network::AddressBook;
pub use state_machine::ShardStateMachine;
pub use types::{NodeId, Raft, TypeConfig};
