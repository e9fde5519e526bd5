//! Vectors stored contiguously by slot: the exact scan reads them in order, and a
//! compaction rebuild reads them back without touching storage.

use crate::Neighbour;
use crate::distance::{Space, SpaceDistance};
use parking_lot::RwLock;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub struct FlatVectors {
    dimension: usize,
    distance: SpaceDistance,
    data: RwLock<Vec<f32>>,
}

/// Max-heap entry by distance, then slot, so ties resolve the same way every time.
#[derive(PartialEq)]
struct Far(f32, usize);
impl Eq for Far {}
impl PartialOrd for Far {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Far {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

impl FlatVectors {
    pub fn new(dimension: usize, space: Space) -> Self {
        Self {
            dimension,
            distance: SpaceDistance::new(space),
            data: RwLock::new(Vec::new()),
        }
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub(crate) fn distance(&self) -> SpaceDistance {
        self.distance
    }

    pub fn len(&self) -> usize {
        self.data.read().len() / self.dimension
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends vectors and returns their slots.
    pub fn push_batch(&self, vectors: &[&[f32]]) -> std::ops::Range<usize> {
        let mut data = self.data.write();
        let start = data.len() / self.dimension;
        for v in vectors {
            assert_eq!(v.len(), self.dimension, "vector dimension is validated before it reaches the index");
            data.extend_from_slice(v);
        }
        start..start + vectors.len()
    }

    pub fn get(&self, slot: usize) -> Option<Vec<f32>> {
        let data = self.data.read();
        let at = slot.checked_mul(self.dimension)?;
        data.get(at..at + self.dimension).map(<[f32]>::to_vec)
    }

    /// The exact `k` nearest among `slots` (all slots if `None`) accepted by `accept`.
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        slots: Option<&[usize]>,
        accept: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<Neighbour> {
        if k == 0 {
            return Vec::new();
        }
        let data = self.data.read();
        let d = self.dimension;
        let n = data.len() / d;
        let mut heap: BinaryHeap<Far> = BinaryHeap::with_capacity(k + 1);
        let mut consider = |slot: usize| {
            if slot >= n || !accept(slot) {
                return;
            }
            let dist = self.distance.eval(query, &data[slot * d..(slot + 1) * d]);
            if heap.len() < k {
                heap.push(Far(dist, slot));
            } else if let Some(top) = heap.peek()
                && Far(dist, slot) < *top
            {
                heap.pop();
                heap.push(Far(dist, slot));
            }
        };
        match slots {
            Some(s) => s.iter().copied().for_each(&mut consider),
            None => (0..n).for_each(&mut consider),
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(|Far(distance, slot)| Neighbour { slot, distance })
            .collect()
    }

    pub fn memory_bytes(&self) -> usize {
        self.data.read().capacity() * 4
    }
}
