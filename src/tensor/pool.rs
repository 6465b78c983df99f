//! Host buffer pool: the storage of a dropped CPU tensor is kept and handed to the
//! next op that asks for the same number of elements, so steady-state inference and
//! training (the same sizes every step) stop allocating after the first step.
//!
//! Why: the activations of a detector at 800x1216 are tens of MiB each, far above
//! the allocator's mmap threshold, so every fresh output was a fresh mapping whose
//! first touch page-faults (measured to dominate the 64-channel 1x1 convolutions).
//!
//! Buffers are matched by exact length (a step repeats its sizes exactly); small ones
//! (below [`MIN_POOLED_BYTES`]) are left to the allocator, which recycles them
//! cheaply. The pool holds at most [`max_pooled_bytes`] bytes; a buffer given back
//! beyond that is freed. [`stats`] counts hits and misses, so a test can check that a
//! warm step misses nothing.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::Element;

/// Buffers smaller than this go straight to the allocator.
pub const MIN_POOLED_BYTES: usize = 64 << 10;

/// Counters of the pool since the process started (or since [`reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served from the pool.
    pub hits: u64,
    /// Requests of a poolable size that had to allocate.
    pub misses: u64,
    /// Bytes held by the pool now.
    pub pooled_bytes: usize,
}

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);
static POOLED: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Free buffers by (element type, length); each entry holds `Vec<T>`s of that type.
type Shelves = HashMap<(TypeId, usize), Vec<Box<dyn Any + Send>>>;

fn shelves() -> &'static Mutex<Shelves> {
    static S: OnceLock<Mutex<Shelves>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The most bytes the pool keeps: `KESTREL_HOST_POOL_MIB` MiB if set (0 turns the
/// pool off), else 2 GiB.
pub fn max_pooled_bytes() -> usize {
    let l = LIMIT.load(Ordering::Relaxed);
    if l != usize::MAX {
        return l;
    }
    let l = std::env::var("KESTREL_HOST_POOL_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(2 << 30, |mib| mib << 20);
    LIMIT.store(l, Ordering::Relaxed);
    l
}

/// The pool's counters now.
pub fn stats() -> PoolStats {
    PoolStats {
        hits: HITS.load(Ordering::Relaxed),
        misses: MISSES.load(Ordering::Relaxed),
        pooled_bytes: POOLED.load(Ordering::Relaxed),
    }
}

/// Zero the hit and miss counters (the pooled buffers stay).
pub fn reset_stats() {
    HITS.store(0, Ordering::Relaxed);
    MISSES.store(0, Ordering::Relaxed);
}

/// Free every pooled buffer.
pub fn clear() {
    let mut s = shelves().lock().unwrap_or_else(|p| p.into_inner());
    s.clear();
    POOLED.store(0, Ordering::Relaxed);
}

fn poolable<T>(len: usize) -> bool {
    len * std::mem::size_of::<T>() >= MIN_POOLED_BYTES
}

/// A buffer of `len` elements whose contents are unspecified (old values of a
/// recycled buffer, or zeros when fresh): the caller writes every element.
pub fn take<T: Element>(len: usize) -> Vec<T> {
    if !poolable::<T>(len) {
        return vec![T::zero(); len];
    }
    let key = (TypeId::of::<T>(), len);
    let found = {
        let mut s = shelves().lock().unwrap_or_else(|p| p.into_inner());
        s.get_mut(&key).and_then(|v| v.pop())
    };
    if let Some(b) = found.and_then(|b| b.downcast::<Vec<T>>().ok()) {
        POOLED.fetch_sub(len * std::mem::size_of::<T>(), Ordering::Relaxed);
        HITS.fetch_add(1, Ordering::Relaxed);
        return *b;
    }
    MISSES.fetch_add(1, Ordering::Relaxed);
    vec![T::zero(); len]
}

/// A buffer of `len` zeros (recycled when possible).
pub fn take_zeroed<T: Element>(len: usize) -> Vec<T> {
    let mut v = take::<T>(len);
    v.fill(T::zero());
    v
}

/// Give a buffer back (called when a CPU tensor's storage is dropped). Buffers are
/// shelved by type and length.
pub(crate) fn give<T: Send + 'static>(v: Vec<T>) {
    let len = v.len();
    let bytes = len * std::mem::size_of::<T>();
    if !poolable::<T>(len) || v.capacity() != len {
        return;
    }
    let limit = max_pooled_bytes();
    if POOLED.fetch_add(bytes, Ordering::Relaxed) + bytes > limit {
        POOLED.fetch_sub(bytes, Ordering::Relaxed);
        return;
    }
    let key = (TypeId::of::<T>(), len);
    let mut s = shelves().lock().unwrap_or_else(|p| p.into_inner());
    s.entry(key).or_default().push(Box::new(v));
}

thread_local! {
    /// Per-thread scratch (im2col slices and the like), kept for the thread's life.
    static SCRATCH: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` elements (contents unspecified).
/// Parallel tasks that each need a temporary (an im2col slice) reuse one buffer per
/// thread instead of allocating one per task. A nested call gets a fresh buffer.
pub fn with_scratch<T: Element, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let words = (len * std::mem::size_of::<T>()).div_ceil(8);
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < words {
                v.resize(words, 0);
            }
            // u64 storage is 8-aligned, enough for f32 and f64; both are Pod.
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut v[..words]);
            let elems: &mut [T] =
                bytemuck::cast_slice_mut(&mut bytes[..len * std::mem::size_of::<T>()]);
            f(elems)
        }
        Err(_) => f(&mut vec![T::zero(); len]),
    })
}

thread_local! {
    /// Per-thread reusable vectors of any element type (sort keys, index lists).
    static VECS: std::cell::RefCell<HashMap<TypeId, Box<dyn Any>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Runs `f` on this thread's empty vector of `T` with room for at least `cap`
/// elements, kept for the next call: temporaries such as sort keys stop allocating
/// once warm. A nested call for the same `T` gets a fresh vector.
pub fn with_vec<T: 'static, R>(cap: usize, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
    let key = TypeId::of::<T>();
    let kept = VECS.with(|m| m.borrow_mut().remove(&key));
    let mut v: Vec<T> = kept
        .and_then(|b| b.downcast::<Vec<T>>().ok())
        .map_or_else(Vec::new, |b| *b);
    v.clear();
    v.reserve(cap);
    let r = f(&mut v);
    v.clear();
    VECS.with(|m| m.borrow_mut().insert(key, Box::new(v)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_handed_out_again() {
        // A length no other test in this binary uses.
        let len = (MIN_POOLED_BYTES / 4) * 3 + 7;
        let before = stats();
        let mut v = take::<f32>(len);
        v[0] = 42.0;
        let p = v.as_ptr();
        give(v);
        let w = take::<f32>(len);
        assert_eq!(w.as_ptr(), p, "the same allocation comes back");
        assert_eq!(w[0], 42.0, "contents are not cleared by take");
        let after = stats();
        assert!(after.hits > before.hits && after.misses > before.misses);
        // f64 of another byte size never aliases an f32 shelf.
        let z = take_zeroed::<f64>(len);
        assert!(z.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_thread_vector_is_reused() {
        let p = with_vec::<(u64, u32), _>(1000, |v| {
            v.push((1, 2));
            v.as_ptr()
        });
        let (q, empty) = with_vec::<(u64, u32), _>(10, |v| (v.as_ptr(), v.is_empty()));
        assert_eq!(p, q, "the same allocation comes back");
        assert!(empty, "handed out empty");
    }

    #[test]
    fn small_buffers_are_not_pooled() {
        let v = take::<f32>(16);
        give(v);
        assert_eq!(take::<f32>(16).len(), 16);
    }
}
