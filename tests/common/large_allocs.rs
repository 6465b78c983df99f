//! A counting global allocator for the host-pool tests: counts every allocation of
//! at least the pool's minimum size (`pool::MIN_POOLED_BYTES`), whoever makes it.
//! Included by path (not through `common`) because a global allocator is
//! process-wide: only the binaries that count allocations install it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kestrel::tensor::pool;

/// Counts allocations of at least `pool::MIN_POOLED_BYTES` bytes.
pub struct Counting;

static LARGE: AtomicU64 = AtomicU64::new(0);

/// Large allocations (including reallocations to a large size) so far.
pub fn large() -> u64 {
    LARGE.load(Ordering::Relaxed)
}

static TRACING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread prints a backtrace (which allocates itself).
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

/// With `KESTREL_TRACE_LARGE_ALLOCS` set in the environment, print the size and a
/// backtrace of every large allocation made while `on` (how the remaining sources
/// are found; the counts do not depend on it).
#[allow(dead_code)]
pub fn trace(on: bool) {
    TRACING.store(
        on && std::env::var_os("KESTREL_TRACE_LARGE_ALLOCS").is_some(),
        Ordering::Relaxed,
    );
}

fn note(size: usize) {
    // The backtrace's own allocations (symbol tables) are not counted.
    if size >= pool::MIN_POOLED_BYTES && !IN_TRACE.with(|t| t.get()) {
        LARGE.fetch_add(1, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed) && !IN_TRACE.with(|t| t.replace(true)) {
            let bt = std::backtrace::Backtrace::force_capture();
            eprintln!("LARGE ALLOC {size} bytes\n{bt}");
            IN_TRACE.with(|t| t.set(false));
        }
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
