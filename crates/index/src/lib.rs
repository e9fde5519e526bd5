//! Vector indexes for one shard replica: the [`VectorIndex`] trait, Sovra's own
//! HNSW engine ([`SovraIndex`]), a second HNSW engine built on hnsw_rs
//! ([`HnswIndex`]), and an exact (brute-force) index that is the oracle in tests.
//!
//! The index knows nothing of points, ids, payloads or storage: it holds vectors
//! under dense *slot* numbers that it hands out itself, and searches with a
//! caller-supplied predicate over slots. The shard crate maps slots to point ids
//! and decides what a predicate accepts (tombstones, expiry, payload filters).
//! [`synth`] generates the seeded datasets the recall tests use. Depends on no
//! other Sovra crate.

mod chunked;
mod distance;
mod exact;
pub mod file;
mod flat;
pub mod fvecs;
mod graph;
mod hnsw;
pub mod synth;

pub use distance::{Space, SpaceDistance, simd_kernels};
pub use exact::ExactIndex;
pub use flat::FlatVectors;
pub use graph::{GraphConfig, SovraIndex};
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

    /// Stores vectors and gives them slots without linking them into a graph
    /// yet: until [`Self::link_pending`] links them, searches find them by an
    /// exact scan of the unlinked tail. Engines without a deferred path link at
    /// once.
    fn append(&self, vectors: &[&[f32]]) -> std::ops::Range<usize> {
        self.add_batch(vectors)
    }

    /// Links every stored, unlinked slot (waiting for a linker already at it);
    /// returns how many this call linked.
    fn link_pending(&self) -> usize {
        0
    }

    /// Slots stored but not linked yet.
    fn pending(&self) -> usize {
        0
    }

    /// Has the pending slots linked in the background (on the index's pool),
    /// or now if it has none.
    fn schedule_linking(self: std::sync::Arc<Self>) {}

    /// Up to `k` nearest slots accepted by `accept` (every slot if `None`),
    /// closest first. Approximate indexes may return fewer than `k` even if more
    /// are accepted, and may return slots `accept` refused: callers re-check every
    /// hit.
    fn search(&self, query: &[f32], k: usize, ef: usize, accept: Option<SlotFilter<'_>>) -> Vec<Neighbour>;

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

    /// Saves the graph to `path` with the caller's `meta` (see [`file`]); slots
    /// `keep` refuses are saved without their vectors. Engines that cannot
    /// save say so.
    fn save(&self, path: &std::path::Path, meta: &[u8], keep: SlotFilter<'_>) -> Result<(), file::IndexFileError> {
        let _ = (path, meta, keep);
        Err(file::IndexFileError::Unsupported("this"))
    }
}

/// Which HNSW engine a node builds its shards' indexes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexEngine {
    /// Sovra's own ([`SovraIndex`]).
    #[default]
    Sovra,
    /// hnsw_rs ([`HnswIndex`]), kept as a second engine to compare against.
    HnswRs,
}

impl IndexEngine {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sovra => "sovra",
            Self::HnswRs => "hnsw_rs",
        }
    }
}

impl std::str::FromStr for IndexEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sovra" => Ok(Self::Sovra),
            "hnsw_rs" | "hnsw-rs" => Ok(Self::HnswRs),
            other => Err(format!("index engine {other:?} is not known: use \"sovra\" or \"hnsw_rs\"")),
        }
    }
}

/// How a shard builds its index: the engine, and the pool bulk inserts run on
/// (the global rayon pool would compete with the async runtime's threads).
#[derive(Clone, Default)]
pub struct IndexOptions {
    pub engine: IndexEngine,
    pub pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

impl IndexOptions {
    pub fn with_pool(pool: std::sync::Arc<rayon::ThreadPool>) -> Self {
        Self {
            engine: IndexEngine::default(),
            pool: Some(pool),
        }
    }

    /// An index loaded from a file [`VectorIndex::save`] wrote, and the caller's
    /// metadata saved with it.
    pub fn load(
        &self,
        path: &std::path::Path,
        dimension: usize,
        space: Space,
        m: usize,
        ef_construction: usize,
    ) -> Result<(Box<dyn VectorIndex>, Vec<u8>), file::IndexFileError> {
        match self.engine {
            IndexEngine::Sovra => {
                let cfg = Self::graph_config(m, ef_construction);
                let (index, meta) = file::load(path, dimension, space, &cfg, self.pool.clone())?;
                Ok((Box::new(index), meta))
            }
            IndexEngine::HnswRs => Err(file::IndexFileError::Unsupported("hnsw_rs")),
        }
    }

    fn graph_config(m: usize, ef_construction: usize) -> GraphConfig {
        GraphConfig {
            m,
            ef_construction,
            seed: 0x5EED_50F7,
        }
    }

    /// An empty index. `m` is validated to 4..=128 upstream.
    pub fn build(&self, dimension: usize, space: Space, m: usize, ef_construction: usize, expected: usize) -> Box<dyn VectorIndex> {
        match self.engine {
            IndexEngine::Sovra => Box::new(SovraIndex::new(
                dimension,
                space,
                &Self::graph_config(m, ef_construction),
                self.pool.clone(),
            )),
            IndexEngine::HnswRs => Box::new(HnswIndex::new(
                dimension,
                space,
                &HnswConfig {
                    m,
                    ef_construction,
                    expected_points: expected,
                },
                self.pool.clone(),
            )),
        }
    }
}
