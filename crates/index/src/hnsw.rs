//! HNSW over hnsw_rs. hnsw_rs cannot delete or update: the shard engine keeps
//! tombstones in its predicate and rebuilds (compacts) the graph to drop them.

use crate::distance::SpaceDistance;
use crate::{FlatVectors, Neighbour, SlotFilter, Space, VectorIndex};
use hnsw_rs::hnsw::Hnsw;
use std::sync::Arc;

/// hnsw_rs's `file_dump` only works with 16 layers; keep the layout dumpable.
const MAX_LAYER: usize = 16;
/// Below this many vectors a parallel insert costs more than it saves.
const PARALLEL_MIN: usize = 64;

#[derive(Debug, Clone)]
pub struct HnswConfig {
    /// Links per node on upper layers; layer 0 gets 2*m. Validated to 4..=128
    /// upstream because hnsw_rs exits the process above 256.
    pub m: usize,
    pub ef_construction: usize,
    /// Capacity hint for hnsw_rs's tables.
    pub expected_points: usize,
}

pub struct HnswIndex {
    vectors: FlatVectors,
    graph: Hnsw<'static, f32, SpaceDistance>,
    /// Pool for bulk inserts: hnsw_rs uses rayon's current pool, and the global
    /// one would compete with the async runtime's threads.
    pool: Option<Arc<rayon::ThreadPool>>,
    m: usize,
}

impl HnswIndex {
    pub fn new(dimension: usize, space: Space, cfg: &HnswConfig, pool: Option<Arc<rayon::ThreadPool>>) -> Self {
        assert!((2..=128).contains(&cfg.m), "m is validated to 4..=128 before it reaches the index");
        let vectors = FlatVectors::new(dimension, space);
        let graph = Hnsw::new(
            cfg.m,
            cfg.expected_points.max(1024),
            MAX_LAYER,
            cfg.ef_construction,
            vectors.distance(),
        );
        Self {
            vectors,
            graph,
            pool,
            m: cfg.m,
        }
    }
}

impl VectorIndex for HnswIndex {
    fn add_batch(&self, vectors: &[&[f32]]) -> std::ops::Range<usize> {
        let slots = self.vectors.push_batch(vectors);
        let items: Vec<(&[f32], usize)> = vectors.iter().copied().zip(slots.clone()).collect();
        match &self.pool {
            Some(pool) if items.len() >= PARALLEL_MIN => pool.install(|| self.graph.parallel_insert_slice(&items)),
            _ => items.iter().for_each(|&item| self.graph.insert_slice(item)),
        }
        slots
    }

    fn search(&self, query: &[f32], k: usize, ef: usize, accept: SlotFilter<'_>) -> Vec<Neighbour> {
        if k == 0 || self.vectors.is_empty() {
            return Vec::new();
        }
        let filter = |slot: &usize| accept(*slot);
        self.graph
            .search_filter(query, k, ef.max(k), Some(&filter))
            .into_iter()
            .map(|n| Neighbour {
                slot: n.d_id,
                distance: n.distance,
            })
            .collect()
    }

    fn vectors(&self) -> &FlatVectors {
        &self.vectors
    }

    fn memory_bytes(&self) -> usize {
        // hnsw_rs keeps its own copy of each vector plus about 3*m links of 8 bytes
        // (an Arc) per point; an estimate, not a measurement.
        let n = self.vectors.len();
        self.vectors.memory_bytes() * 2 + n * (3 * self.m * 8 + 96)
    }
}
