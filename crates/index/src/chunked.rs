//! Append-only storage in chunks that never move: rows are written once by the
//! single writer and then read by any thread without a lock.
//!
//! Chunk `c` holds `FIRST << c` rows, so capacity doubles without ever copying
//! (a growing `Vec` would move the rows under concurrent readers). Memory is
//! allocated zeroed and aligned to a cache line; rows of `T` are valid when zero
//! ([`ZeroValid`]). Large chunks are anonymous memory maps, so the part of the
//! last chunk not yet written costs address space, not memory: a page becomes
//! resident when a row on it is first written.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::OnceLock;

/// Rows in the first chunk (log2). Small so that a tiny shard stays tiny.
const FIRST_BITS: u32 = 8;
/// Enough chunks for 2^(8+40) rows: never the limit.
const MAX_CHUNKS: usize = 40;
const ALIGN: usize = 64;

/// # Safety
/// The all-zero bit pattern must be a valid `T`.
pub(crate) unsafe trait ZeroValid {}
// SAFETY: zero is 0.0, 0 and null respectively.
unsafe impl ZeroValid for f32 {}
unsafe impl ZeroValid for std::sync::atomic::AtomicU32 {}
unsafe impl<T> ZeroValid for std::sync::atomic::AtomicPtr<T> {}

/// Chunks at least this large are mapped, not allocated.
const MAP_BYTES: usize = 1 << 20;
/// Mapped chunks at least this large (a few huge pages) ask for huge pages;
/// below it the rounding to 2 MiB would cost more memory than it saves misses.
const HUGE_PAGE_BYTES: usize = 16 << 20;

struct Chunk<T> {
    ptr: NonNull<T>,
    layout: Layout,
    mapped: bool,
}

// SAFETY: a chunk is plain memory owned by its `Chunked`; sharing it is governed by
// `Chunked`'s own rules (below).
unsafe impl<T: Send> Send for Chunk<T> {}
unsafe impl<T: Sync> Sync for Chunk<T> {}

impl<T> Drop for Chunk<T> {
    fn drop(&mut self) {
        // Rows of the types stored here need no drop (floats and atomics).
        #[cfg(unix)]
        if self.mapped {
            // SAFETY: mapped in `Chunked::chunk` with this length, unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
            return;
        }
        // SAFETY: allocated in `Chunked::chunk` with this layout.
        unsafe { dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

/// Rows of `stride` values of `T`, addressed by slot.
///
/// Rules that make the lock-free reads sound:
/// - [`Chunked::reserve`] runs before any row of a slot is written or read.
/// - A row is written through [`Chunked::row_ptr`] only by the one thread that
///   owns the slot at that time, and only before the slot is published to readers
///   by a release store that readers acquire (or, for atomics, at any time).
pub(crate) struct Chunked<T> {
    stride: usize,
    chunks: [OnceLock<Chunk<T>>; MAX_CHUNKS],
    _t: PhantomData<T>,
}

#[inline]
fn locate(slot: usize) -> (usize, usize) {
    let x = slot + (1usize << FIRST_BITS);
    let high = usize::BITS - 1 - x.leading_zeros();
    ((high - FIRST_BITS) as usize, x - (1usize << high))
}

impl<T: ZeroValid> Chunked<T> {
    pub fn new(stride: usize) -> Self {
        assert!(stride > 0);
        Self {
            stride,
            chunks: std::array::from_fn(|_| OnceLock::new()),
            _t: PhantomData,
        }
    }

    fn chunk(&self, c: usize) -> &Chunk<T> {
        self.chunks[c].get_or_init(|| {
            let rows = 1usize << (FIRST_BITS as usize + c);
            let bytes = rows
                .checked_mul(self.stride)
                .and_then(|n| n.checked_mul(size_of::<T>()))
                .expect("chunk size overflows");
            let layout = Layout::from_size_align(bytes, ALIGN.max(align_of::<T>())).expect("chunk layout");
            #[cfg(unix)]
            if bytes >= MAP_BYTES {
                // SAFETY: a fresh private anonymous mapping: zeroed, page aligned
                // (more than ALIGN), owned by this chunk alone.
                let raw = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if raw == libc::MAP_FAILED {
                    handle_alloc_error(layout);
                }
                // Searches touch rows at random: with 4 KiB pages nearly every
                // row of a large index is a TLB miss. Ask for transparent huge
                // pages (the kernel's default mode is `madvise`); it is a hint,
                // and a refusal leaves ordinary pages.
                if bytes >= HUGE_PAGE_BYTES {
                    // SAFETY: advice on the mapping made just above.
                    unsafe { libc::madvise(raw, bytes, libc::MADV_HUGEPAGE) };
                }
                let ptr = NonNull::new(raw.cast::<T>()).unwrap_or_else(|| handle_alloc_error(layout));
                return Chunk { ptr, layout, mapped: true };
            }
            // SAFETY: `bytes` > 0 (rows and stride are >= 1, T is not zero-sized).
            let raw = unsafe { alloc_zeroed(layout) };
            let ptr = NonNull::new(raw.cast::<T>()).unwrap_or_else(|| handle_alloc_error(layout));
            Chunk {
                ptr,
                layout,
                mapped: false,
            }
        })
    }

    /// Makes sure the row of `slot` exists (allocating its chunk, zeroed).
    pub fn reserve(&self, slot: usize) {
        self.chunk(locate(slot).0);
    }

    /// Whether `slot`'s row exists.
    pub fn is_reserved(&self, slot: usize) -> bool {
        self.chunks[locate(slot).0].get().is_some()
    }

    /// Pointer to the first value of `slot`'s row, which must be reserved.
    #[inline]
    pub fn row_ptr(&self, slot: usize) -> *mut T {
        let (c, off) = locate(slot);
        let chunk = self.chunks[c].get().expect("row read before it was reserved");
        // SAFETY: `off < rows of chunk c`, so the row lies inside the allocation.
        unsafe { chunk.ptr.as_ptr().add(off * self.stride) }
    }

    /// The row of `slot`, which must be reserved and, for non-atomic `T`, published.
    ///
    /// # Safety
    /// For non-atomic `T`: no thread may write this row while the borrow lives
    /// (the rows are written once, before publication).
    #[inline]
    pub unsafe fn row(&self, slot: usize) -> &[T] {
        // SAFETY: the row is inside one live allocation, initialised (zeroed or
        // written), and not written while borrowed (caller's promise, or atomics).
        unsafe { std::slice::from_raw_parts(self.row_ptr(slot), self.stride) }
    }

    /// Bytes allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.chunks.iter().filter_map(OnceLock::get).map(|c| c.layout.size()).sum()
    }
}

/// A row of atomics is always safe to share.
impl Chunked<std::sync::atomic::AtomicU32> {
    #[inline]
    pub fn atomic_row(&self, slot: usize) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: atomics may be read while others write them.
        unsafe { self.row(slot) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_covers_every_slot_once() {
        let mut expect = (0usize, 0usize);
        for slot in 0..100_000 {
            let (c, off) = locate(slot);
            assert_eq!((c, off), expect, "slot {slot}");
            expect.1 += 1;
            if expect.1 == 1 << (FIRST_BITS as usize + expect.0) {
                expect = (expect.0 + 1, 0);
            }
        }
    }

    #[test]
    fn mapped_chunks_are_zeroed_and_writable() {
        let c: Chunked<f32> = Chunked::new(1100); // the first chunk is over MAP_BYTES
        for slot in [0, 255, 256, 1000] {
            c.reserve(slot);
            // SAFETY: single-threaded test.
            unsafe {
                assert!(c.row(slot).iter().all(|&x| x == 0.0));
                *c.row_ptr(slot).add(1099) = 1.5;
                assert_eq!(c.row(slot)[1099], 1.5);
            }
        }
        assert!(c.chunks[0].get().expect("reserved").mapped);
    }

    #[test]
    fn rows_are_zeroed_aligned_and_stable() {
        let c: Chunked<f32> = Chunked::new(5);
        c.reserve(0);
        let p0 = c.row_ptr(0);
        assert_eq!(p0 as usize % ALIGN, 0);
        for slot in 0..5000 {
            c.reserve(slot);
            // SAFETY: single-threaded test.
            unsafe {
                assert!(c.row(slot).iter().all(|&x| x == 0.0));
                *c.row_ptr(slot) = slot as f32;
            }
        }
        assert_eq!(c.row_ptr(0), p0, "growing never moves rows");
        // SAFETY: as above.
        assert_eq!(unsafe { c.row(4321)[0] }, 4321.0);
    }
}
