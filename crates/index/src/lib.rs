//! Vector indexes for one shard replica: the [`VectorIndex`] trait, an HNSW graph
//! built on hnsw_rs, and an exact (brute-force) index that is the oracle in tests.
//!
//! The index knows nothing of points, ids, payloads or storage: it holds vectors
//! under dense *slot* numbers that it hands out itself, and searches with a
//! caller-supplied predicate over slots. The shard crate maps slots to point ids
//! and decides what a predicate accepts (tombstones, expiry, payload filters).
//! [`synth`] generates the seeded datasets the recall tests use. Depends on no
//! other Sovra crate.

mod distance;
mod exact;
mod flat;
pub mod fvecs;
mod hnsw;
pub mod synth;

pub use distance::Space;
pub use exact::ExactIndex;
pub use flat::FlatVectors;
pub use hnsw::{HnswConfig, HnswIndex};

/// One search hit: a slot and its distance to the query (lower is closer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub slot: usize,
    pub distance: f32,
}

/// A predicate over slots, evaluated inside the search.
pub type SlotFilter<'a> = &'a (dyn Fn(usize) -> bool + Sync);

/// What the shard engine needs from an index. Implementations must be safe to
/// search from many threads while one thread adds.
pub trait VectorIndex: Send + Sync {
    /// Adds vectors (already validated and, for cosine, normalised) and returns the
    /// slots they were given, consecutive and in order.
    fn add_batch(&self, vectors: &[&[f32]]) -> std::ops::Range<usize>;

    /// Up to `k` nearest slots accepted by `accept`, closest first. Approximate
    /// indexes may return fewer than `k` even if more are accepted, and may return
    /// slots `accept` refused: callers re-check every hit.
    fn search(&self, query: &[f32], k: usize, ef: usize, accept: SlotFilter<'_>) -> Vec<Neighbour>;

    /// The stored vectors, for exact scans and rebuilds.
    fn vectors(&self) -> &FlatVectors;

    /// Number of slots handed out (live or not: the index cannot delete).
    fn len(&self) -> usize {
        self.vectors().len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate memory held, for reports.
    fn memory_bytes(&self) -> usize;
}
