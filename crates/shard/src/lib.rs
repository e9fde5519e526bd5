//! One shard replica's state: a sled store and an in-memory index, changed only by
//! [`ShardEngine::apply`], plus the node's catalog of collections.
//!
//! - [`store`]: the on-disk layout of one shard (points, subject index, expiry
//!   index, `last_applied`), written in one atomic sled batch per command.
//! - [`live`]: the searchable view: an index of slots, the slot table mapping slots
//!   to point ids with tombstones, and the search strategy (filtered HNSW, exact
//!   scan of a small matching set, re-check of every hit).
//! - [`engine`]: apply, read, search, digest, and compaction (rebuild without
//!   tombstones while reads and writes go on, then swap).
//! - [`replica`]: one replica's own directory and sled database (its points
//!   and its Raft log), page cache shared out from one node budget.
//! - [`catalog`]: the node's own small database: its format version and the
//!   collection specs.
//!
//! No networking, no clock (callers pass `now_ms`), no protobuf. Depends on
//! `sovra-types` and `sovra-index` only.

pub mod catalog;
pub mod engine;
mod error;
pub mod live;
pub mod replica;
pub mod store;

pub use catalog::NodeStore;
pub use engine::{ApplyOutcome, CompactionReport, EntryOutcome, Hit, SearchParams, ShardEngine, ShardStats};
pub use error::ShardError;
pub use replica::{CacheBudget, ReplicaStore};
pub use store::{Rejection, Rejections, Suppression, id_tag, subject_tag};
