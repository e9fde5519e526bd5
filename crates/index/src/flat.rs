//! Vectors stored contiguously by slot: the exact scan reads them in order, and a
//! compaction rebuild reads them back without touching storage.

use crate::Neighbour;
use crate::chunked::Chunked;
use crate::distance::{Space, SpaceDistance};
use parking_lot::Mutex;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

/// Rows are padded to a multiple of this many floats so every row starts 32-byte
/// aligned (the chunks are cache-line aligned).
const ROW_ALIGN_FLOATS: usize = 8;

pub struct FlatVectors {
    dimension: usize,
    distance: SpaceDistance,
    rows: Chunked<f32>,
    /// Rows below this are written and visible; published with release order
    /// after the rows are written.
    len: AtomicUsize,
    /// One writer at a time hands out slots.
    writer: Mutex<()>,
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
        assert!(dimension > 0, "dimension is validated before it reaches the index");
        Self {
            dimension,
            distance: SpaceDistance::new(space),
            rows: Chunked::new(dimension.div_ceil(ROW_ALIGN_FLOATS) * ROW_ALIGN_FLOATS),
            len: AtomicUsize::new(0),
            writer: Mutex::new(()),
        }
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub(crate) fn distance(&self) -> SpaceDistance {
        self.distance
    }

    pub fn len(&self) -> usize {
        self.len.load(AtomicOrdering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends vectors and returns their slots. Writers are serialised; readers
    /// see the new rows once this returns.
    pub fn push_batch(&self, vectors: &[&[f32]]) -> std::ops::Range<usize> {
        let _one_writer = self.writer.lock();
        let start = self.len.load(AtomicOrdering::Relaxed);
        for (i, v) in vectors.iter().enumerate() {
            assert_eq!(v.len(), self.dimension, "vector dimension is validated before it reaches the index");
            let slot = start + i;
            self.rows.reserve(slot);
            // SAFETY: the slot is at or past `len`, so no reader looks at this row
            // yet, and the writer lock makes this thread its only writer.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.rows.row_ptr(slot), self.dimension) };
        }
        self.len.store(start + vectors.len(), AtomicOrdering::Release);
        start..start + vectors.len()
    }

    /// The row of a published slot, without the bounds check.
    ///
    /// # Safety
    /// `slot` must be below a value of [`Self::len`] this thread has observed (or
    /// reached through a link published after it).
    #[inline]
    pub(crate) unsafe fn row_unchecked(&self, slot: usize) -> &[f32] {
        // SAFETY: published rows are never written again.
        unsafe { &self.rows.row(slot)[..self.dimension] }
    }

    /// Address of a published row, for prefetching.
    #[inline]
    pub(crate) fn row_address(&self, slot: usize) -> *const f32 {
        self.rows.row_ptr(slot)
    }

    pub(crate) fn row(&self, slot: usize) -> Option<&[f32]> {
        // SAFETY: checked against the published length.
        (slot < self.len()).then(|| unsafe { self.row_unchecked(slot) })
    }

    pub fn get(&self, slot: usize) -> Option<Vec<f32>> {
        self.row(slot).map(<[f32]>::to_vec)
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
        let n = self.len();
        let mut heap: BinaryHeap<Far> = BinaryHeap::with_capacity(k + 1);
        let mut consider = |slot: usize| {
            if slot >= n || !accept(slot) {
                return;
            }
            // SAFETY: slot < n, a published length.
            let dist = self.distance.eval(query, unsafe { self.row_unchecked(slot) });
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

    /// The exact `k` nearest among the slots of `range` that `accept` takes.
    pub(crate) fn exact_range(
        &self,
        query: &[f32],
        k: usize,
        range: std::ops::Range<usize>,
        accept: Option<&(dyn Fn(usize) -> bool + Sync)>,
    ) -> Vec<Neighbour> {
        let n = self.len();
        let range = range.start.min(n)..range.end.min(n);
        if range.is_empty() {
            return Vec::new();
        }
        let slots: Vec<usize> = range.collect();
        self.exact_search(query, k, Some(&slots), accept.unwrap_or(&|_| true))
    }

    pub fn memory_bytes(&self) -> usize {
        self.rows.allocated_bytes()
    }
}
