//! Cluster metadata: what the meta group replicates. Nodes (labels, roles,
//! state, addresses), collections, the shard map (each shard's hash range and
//! recorded replicas, with a version), region policies, API keys (hashes
//! and scopes; [`keys`]), and erasure jobs (ids, kinds, counts, every
//! replica's purge progress, and the receipt built from them; [`erasure`]).
//!
//! - [`placement`]: where a new collection's replicas go; a pure function.
//! - [`state`]: [`state::MetaState::apply`], deterministic over plain data, which
//!   itself refuses anything that would put a replica on a node outside its
//!   shard's region (R1), whoever submits it.
//! - [`ops`]: operations jobs (replica moves, drains, rebalances) recorded
//!   here and advanced by a pure function of the state, so they resume
//!   after any restart and can be listed and cancelled.
//! - [`rebalance`]: replica moves that drain a node or even out a region,
//!   never across regions and never below a shard's replica count; pure.
//! - [`audit`]: which data nodes of each region hold its audit log; a pure
//!   function.
//! - [`voters`]: which meta-role nodes vote (at most five, odd, spread over
//!   regions and zones); a pure function.
//!
//! Holds no personal data (no vectors, payloads or subject ids), does no I/O,
//! reads no clock (callers pass times in commands) and knows nothing of Raft:
//! the glue that makes this a Raft state machine lives above it. Depends on
//! `sovra-types` (and `sha2` for key hashes) only.

pub mod audit;
pub mod erasure;
pub mod keys;
pub mod ops;
pub mod placement;
pub mod rebalance;
pub mod state;
pub mod voters;

pub use placement::{Candidate, PlacementError, place_collection};
pub use state::{Applied, MetaCommand, MetaState, NodeRecord, NodeStatus, Refused, Roles};

/// The cluster's metadata as a node last saw it.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The meta group's applied index the state reflects (0: never seen).
    pub index: u64,
    pub state: MetaState,
}
