//! The read path across the cluster, split as quickwit splits its search:
//!
//! - [`root`]: the coordinator side of one public read. It picks the regions
//!   a caller may read whose policy lets results come to this node's region
//!   (R3; [`plan`]), resolves each shard's replicas from the node's metadata
//!   view (refreshed when a leaf says it moved), sends one leaf request per
//!   shard to a replica (this node, then its zone, then the rest; the leader
//!   first for linearizable reads) with a deadline and one hedged request
//!   after a delay, and merges the answers.
//! - [`leaf`]: one replica answering one shard's part (`ShardSearch`,
//!   `ShardGet`, `ShardScroll` on the cluster listener, or a direct call when
//!   the replica is on the coordinator's node). It refuses a shard of another
//!   region (R2) and checks the region policy again (R3).
//! - [`wire`]: the queries and answers the two exchange.
//! - [`pool`]: the fixed, lower-priority threads leaf reads run on.
//!
//! Depends on `sovra-raft` (replicas, read levels, peer channels),
//! `sovra-shard` (engines), `sovra-meta` (the view: shard map, nodes,
//! policies) and `sovra-proto`. Knows nothing of the public API's messages
//! or of API keys: the node's handlers authenticate and convert.

pub mod leaf;
pub mod plan;
pub mod pool;
pub mod root;
pub mod wire;

pub use leaf::{Leaf, LeafService};
pub use pool::SearchPool;
pub use root::{Root, RootConfig};

use sovra_meta::View;
use std::sync::Arc;

/// What the coordinator and leaf need from the node they run in.
#[tonic::async_trait]
pub trait NodeContext: Send + Sync + 'static {
    /// The node's current metadata view.
    fn view(&self) -> Arc<View>;
    /// Brings the view up to the meta group's latest state (best effort).
    async fn refresh(&self);
    /// A storage error while reading a replica: the node stops (acknowledged
    /// state may not be on disk); the answer says to go elsewhere.
    fn storage_failed(&self, e: sovra_shard::ShardError) -> tonic::Status;
    /// Why this node's replica of `shard` failed to open, if it did.
    fn failure(&self, shard: &sovra_types::ShardId) -> Option<String>;
}
