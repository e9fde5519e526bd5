//! Brute-force search over every stored vector: the recall oracle in tests and
//! benchmarks, and a valid (if slow) index for tiny shards.

use crate::{FlatVectors, Neighbour, SlotFilter, Space, VectorIndex};

pub struct ExactIndex {
    vectors: FlatVectors,
}

impl ExactIndex {
    pub fn new(dimension: usize, space: Space) -> Self {
        Self {
            vectors: FlatVectors::new(dimension, space),
        }
    }
}

impl VectorIndex for ExactIndex {
    fn add_batch(&self, vectors: &[&[f32]]) -> std::ops::Range<usize> {
        self.vectors.push_batch(vectors)
    }

    fn search(&self, query: &[f32], k: usize, _ef: usize, accept: Option<SlotFilter<'_>>) -> Vec<Neighbour> {
        self.vectors.exact_search(query, k, None, accept.unwrap_or(&|_| true))
    }

    fn vectors(&self) -> &FlatVectors {
        &self.vectors
    }

    fn memory_bytes(&self) -> usize {
        self.vectors.memory_bytes()
    }
}
