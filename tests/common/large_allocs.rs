//! A counting global allocator for the host-pool tests: counts every allocation of
//! at least the pool's minimum size (`pool::MIN_POOLED_BYTES`), whoever makes it.
//! Included by path (not through `common`) because a global allocator is
//! process-wide: only the binaries that count allocations install it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use kestrel::tensor::pool;

/// Counts allocations of at least `pool::MIN_POOLED_BYTES` bytes.
pub struct Counting;

static LARGE: AtomicU64 = AtomicU64::new(0);

/// Large allocations (including reallocations to a large size) so far.
pub fn large() -> u64 {
    LARGE.load(Ordering::Relaxed)
}

fn note(size: usize) {
    if size >= pool::MIN_POOLED_BYTES {
        LARGE.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}
