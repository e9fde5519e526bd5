//! HNSW over hnsw_rs. hnsw_rs cannot delete or update: the shard engine keeps
//! tombstones in its predicate and rebuilds (compacts) the graph to drop them.

use crate::distance::SpaceDistance;
use crate::{FlatVectors, GraphConfig, Neighbour, SlotFilter, SovraIndex, Space, VectorIndex};
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

impl HnswIndex {
    /// hnsw_rs's graph copied link for link into Sovra's layout, to be searched
    /// by Sovra's search: separates what the graph is worth from what hnsw_rs's
    /// search costs.
    pub fn freeze(&self, cfg: &GraphConfig) -> SovraIndex {
        let n = self.vectors.len();
        let mut levels = vec![0usize; n];
        let mut lists: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
        for p in self.graph.get_point_indexation() {
            let slot = p.get_origin_id();
            let level = p.get_point_id().0 as usize;
            if slot >= n {
                continue;
            }
            levels[slot] = level;
            lists[slot] = p
                .get_neighborhood_id()
                .into_iter()
                .take(level + 1)
                .map(|layer| layer.into_iter().map(|nb| nb.d_id as u32).collect())
                .collect();
        }
        let rows: Vec<Vec<f32>> = (0..n).filter_map(|s| self.vectors.get(s)).collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        SovraIndex::from_lists(
            self.vectors.dimension(),
            self.vectors.distance().space(),
            cfg,
            &refs,
            &levels,
            |s, l| lists[s].get(l).cloned().unwrap_or_default(),
        )
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

    fn search(&self, query: &[f32], k: usize, ef: usize, accept: Option<SlotFilter<'_>>) -> Vec<Neighbour> {
        if k == 0 || self.vectors.is_empty() {
            return Vec::new();
        }
        // With a filter hnsw_rs skips the paper's early stop: pass one only when
        // something must be refused.
        let filter = accept.map(|accept| move |slot: &usize| accept(*slot));
        self.graph
            .search_filter(query, k, ef.max(k), filter.as_ref().map(|f| f as &dyn hnsw_rs::hnsw::FilterT))
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
