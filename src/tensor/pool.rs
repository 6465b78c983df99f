//! Host buffer pool: the storage of a dropped CPU tensor is kept and handed to the
//! next op that asks for the same number of elements, so steady-state inference and
//! training (the same sizes every step) stop allocating after the first step.
//!
//! Why: the activations of a detector at 800x1216 are tens of MiB each, far above
//! the allocator's mmap threshold, so every fresh output was a fresh mapping whose
//! first touch page-faults (measured to dominate the 64-channel 1x1 convolutions).
//!
//! A request takes the smallest pooled buffer of its element type holding at least
//! its length and at most 50% more (a step repeats its sizes, and nearby sizes share
//! buffers); small ones (below [`MIN_POOLED_BYTES`]) are left to the allocator, which
//! recycles them cheaply. The pool is bounded so that it does not raise peak memory
//! much: buffers handed out plus buffers pooled stay within 2x the most ever
//! handed out at once (a miss frees the largest pooled buffers first), and the pool
//! holds at most [`max_pooled_bytes`]. [`stats`] counts hits, misses and those
//! bytes, so a test can check that a warm step misses nothing and the bound holds.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::Element;

/// What the pool holds: plain-data elements (f32 and f64 tensors, i64 indices and
/// labels, packed sort keys); each type has its own shelves.
pub trait Pooled: bytemuck::Pod + Send + Sync {}

impl<T: bytemuck::Pod + Send + Sync> Pooled for T {}

/// Buffers smaller than this go straight to the allocator.
pub const MIN_POOLED_BYTES: usize = 64 << 10;

/// A request for `len` elements may take a pooled buffer of up to
/// `len * SLACK_NUM / SLACK_DEN` elements (the best fit: the smallest such). Why not
/// only exact lengths: a detector's activations come in many nearby sizes, and a
/// pool matching lengths exactly kept, at the live peak, every buffer freed earlier
/// in the pass whose length was not asked for again until the next pass (+160 MiB
/// of peak RSS in R50-FPN inference). The bound keeps the unused tail of a reused
/// buffer small; 1.5 missed fewest in a simulation over a recorded R50-FPN pass.
const SLACK_NUM: usize = 3;
const SLACK_DEN: usize = 2;

/// The pool's bound: buffers handed out plus buffers pooled stay within
/// `FOOTPRINT_NUM / FOOTPRINT_DEN` times the live high-water mark (a miss frees the
/// largest pooled buffers first to make room). Without it the pool's footprint was
/// 1.3x the live peak in R50-FPN inference at batch 1 (the buffers of one pass do
/// not tile the next pass's requests exactly). A simulation over a recorded pass
/// (~190 requests): at 1.2x a warm pass misses 3 (30-60 MB buffers), 1.1x 6,
/// 1.0x 26; the fixture detector (two small images) needs 1.8x: it missed 11 of 47
/// requests per warm pass at 1.2x, 4 at 1.5x, none at 2x (where it holds 1.8x; 2.3x
/// unbounded), so the default is 2x. `KESTREL_HOST_POOL_BOUND` (percent) overrides
/// it.
const FOOTPRINT_NUM: usize = 2;
const FOOTPRINT_DEN: usize = 1;

/// Counters of the pool since the process started (or since [`reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served from the pool.
    pub hits: u64,
    /// Requests of a poolable size that had to allocate.
    pub misses: u64,
    /// Bytes held by the pool now.
    pub pooled_bytes: usize,
    /// Bytes of pooled-size buffers handed out and not given back, now.
    pub live_bytes: usize,
    /// The most [`PoolStats::live_bytes`] since the process started (or since
    /// [`clear`]): the working set the pool is bounded by.
    pub live_peak_bytes: usize,
    /// The most bytes held by the pool and handed out together (pooled plus live)
    /// since the process started (or since [`clear`]): at most
    /// `2 * live_peak_bytes` (by default).
    pub footprint_peak_bytes: usize,
    /// Buffers the pool freed to stay within its bound.
    pub evictions: u64,
}

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);
static EVICTIONS: AtomicU64 = AtomicU64::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Free buffers of one element type by capacity (elements); each entry holds
/// `Vec<T>`s of that type and capacity.
struct Shelf {
    elem_bytes: usize,
    by_cap: BTreeMap<usize, Vec<Box<dyn Any + Send>>>,
}

/// The free buffers and the byte counts, under one lock.
#[derive(Default)]
struct Shelves {
    free: HashMap<TypeId, Shelf>,
    /// Buffers handed out by [`take`] and not given back: address -> bytes.
    out: HashMap<usize, usize>,
    pooled: usize,
    live: usize,
    live_peak: usize,
    footprint_peak: usize,
}

impl Shelves {
    fn note_peaks(&mut self) {
        self.live_peak = self.live_peak.max(self.live);
        self.footprint_peak = self.footprint_peak.max(self.live + self.pooled);
    }
}

fn shelves() -> std::sync::MutexGuard<'static, Shelves> {
    static S: OnceLock<Mutex<Shelves>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Shelves::default()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The most bytes the pool keeps: `KESTREL_HOST_POOL_MIB` MiB if set (0 turns the
/// pool off), else a quarter of the machine's physical memory, at least 2 GiB (2 GiB
/// where the memory size is unknown); the footprint bound (see `FOOTPRINT_NUM`)
/// applies as well, and is what bounds peak memory.
///
/// Why not a flat 2 GiB (the default until 2026-12-03): an R50-FPN training step at
/// batch 2 hands back ~3.4 GiB between steps (its activations and gradients), so a
/// 2 GiB pool evicted its largest buffers every step and the next step page-faulted
/// fresh mappings for them: 35 evictions over 3 steps, the step 1.11x slower (7814
/// vs 7008 ms, backward 5181 vs 4633 ms) at the same peak RSS (3890 MB either way:
/// the peak is live + pooled, which the footprint bound holds); batch 1 (1.8 GiB
/// pooled) never reached the limit. Intel Xeon family 6 model 167, 2 threads,
/// `kestrel bench --device cpu --batch 2 --train --no-infer --iters 2 --warmup 1
/// --flush-denormals --op-times` with and without `KESTREL_HOST_POOL_MIB=4096`.
/// The limit is for machines where a pool of the live peak would crowd out the rest.
pub fn max_pooled_bytes() -> usize {
    let l = LIMIT.load(Ordering::Relaxed);
    if l != usize::MAX {
        return l;
    }
    let l = std::env::var("KESTREL_HOST_POOL_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or_else(default_limit, |mib| mib << 20);
    LIMIT.store(l, Ordering::Relaxed);
    l
}

/// The default limit on this machine: [`limit_for_memory`] of `MemTotal` in
/// /proc/meminfo.
fn default_limit() -> usize {
    limit_for_memory(
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total_bytes(&m)),
    )
}

/// A quarter of `total` bytes of physical memory, at least 2 GiB; 2 GiB where the
/// total is unknown.
fn limit_for_memory(total: Option<usize>) -> usize {
    const FLOOR: usize = 2 << 30;
    total.map_or(FLOOR, |t| (t / 4).max(FLOOR))
}

/// `MemTotal` of a /proc/meminfo text, in bytes (the file gives kB).
fn mem_total_bytes(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: usize = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The pool's counters now.
pub fn stats() -> PoolStats {
    let s = shelves();
    PoolStats {
        hits: HITS.load(Ordering::Relaxed),
        misses: MISSES.load(Ordering::Relaxed),
        pooled_bytes: s.pooled,
        live_bytes: s.live,
        live_peak_bytes: s.live_peak,
        footprint_peak_bytes: s.footprint_peak,
        evictions: EVICTIONS.load(Ordering::Relaxed),
    }
}

/// Zero the hit, miss and eviction counters (the pooled buffers stay).
pub fn reset_stats() {
    HITS.store(0, Ordering::Relaxed);
    MISSES.store(0, Ordering::Relaxed);
    EVICTIONS.store(0, Ordering::Relaxed);
}

/// Free every pooled buffer and restart the live high-water mark from what is live
/// now.
pub fn clear() {
    let dropped = {
        let mut s = shelves();
        s.pooled = 0;
        s.live_peak = s.live;
        s.footprint_peak = s.live;
        std::mem::take(&mut s.free)
    };
    // Freed outside the lock.
    drop(dropped);
}

fn poolable<T>(len: usize) -> bool {
    len * std::mem::size_of::<T>() >= MIN_POOLED_BYTES
}

/// A buffer of `len` elements whose contents are unspecified (old values of a
/// recycled buffer, or zeros when fresh): the caller writes every element. Its
/// capacity may exceed `len` (a recycled buffer up to 50% larger).
pub fn take<T: Pooled>(len: usize) -> Vec<T> {
    if !poolable::<T>(len) {
        return vec![T::zeroed(); len];
    }
    let size = std::mem::size_of::<T>();
    let most = len.saturating_mul(SLACK_NUM) / SLACK_DEN;
    let mut evicted = Vec::new();
    let found = {
        let mut s = shelves();
        let got = s.free.get_mut(&TypeId::of::<T>()).and_then(|shelf| {
            let (&cap, bufs) = shelf.by_cap.range_mut(len..=most).next()?;
            let b = bufs.pop()?;
            if bufs.is_empty() {
                shelf.by_cap.remove(&cap);
            }
            Some(b)
        });
        let got = got.and_then(|b| b.downcast::<Vec<T>>().ok().map(|b| *b));
        match &got {
            Some(v) => s.pooled -= v.capacity() * size,
            None => evicted = make_room(&mut s, len * size),
        }
        got
    };
    drop(evicted);
    let v = match found {
        Some(mut v) => {
            HITS.fetch_add(1, Ordering::Relaxed);
            // Within the capacity: no reallocation; zeros only past the old length.
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, T::zeroed());
            }
            v
        }
        None => {
            MISSES.fetch_add(1, Ordering::Relaxed);
            vec![T::zeroed(); len]
        }
    };
    let bytes = v.capacity() * size;
    let mut s = shelves();
    // An address still listed belongs to a buffer that left without coming back
    // (moved out of its tensor, freed elsewhere): it is not live any more.
    if let Some(stale) = s.out.insert(v.as_ptr() as usize, bytes) {
        s.live -= stale;
    }
    s.live += bytes;
    s.note_peaks();
    drop(s);
    v
}

/// The most bytes handed out and pooled together for a live high-water mark:
/// `KESTREL_HOST_POOL_BOUND` percent of it if set (at least 100), else
/// `FOOTPRINT_NUM / FOOTPRINT_DEN`.
fn footprint_bound(live_peak: usize) -> usize {
    static PERCENT: OnceLock<usize> = OnceLock::new();
    let pct = *PERCENT.get_or_init(|| {
        std::env::var("KESTREL_HOST_POOL_BOUND")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(100 * FOOTPRINT_NUM / FOOTPRINT_DEN, |p| p.max(100))
    });
    live_peak / 100 * pct
}

/// Before a fresh allocation of `bytes`: the largest pooled buffers, taken off their
/// shelves until the footprint with the new buffer fits the bound (to be freed by
/// the caller outside the lock).
fn make_room(s: &mut Shelves, bytes: usize) -> Vec<Box<dyn Any + Send>> {
    let bound = footprint_bound(s.live_peak.max(s.live + bytes));
    let mut evicted = Vec::new();
    while s.live + s.pooled + bytes > bound {
        let Some(b) = evict_largest(s) else {
            break;
        };
        evicted.push(b);
    }
    EVICTIONS.fetch_add(evicted.len() as u64, Ordering::Relaxed);
    evicted
}

/// A buffer of `len` zeros (recycled when possible).
pub fn take_zeroed<T: Pooled>(len: usize) -> Vec<T> {
    let mut v = take::<T>(len);
    v.fill(T::zeroed());
    v
}

/// An empty buffer with room for `cap` elements (recycled when possible), for code
/// that pushes its results.
pub fn take_empty<T: Pooled>(cap: usize) -> Vec<T> {
    let mut v = take::<T>(cap);
    v.clear();
    v
}

/// Give a buffer back (called when a CPU tensor's storage is dropped). Buffers are
/// shelved by type and capacity; where this one would take the pool past
/// [`max_pooled_bytes`], the pool first frees its largest other buffers.
pub(crate) fn give<T: Pooled>(v: Vec<T>) {
    let size = std::mem::size_of::<T>();
    let cap = v.capacity();
    if !poolable::<T>(cap) {
        return;
    }
    let bytes = cap * size;
    let limit = max_pooled_bytes();
    let evicted;
    {
        let mut s = shelves();
        // Buffers made outside the pool (from_vec) were never counted as live.
        let was_live = match s.out.remove(&(v.as_ptr() as usize)) {
            Some(b) => {
                s.live -= b;
                true
            }
            None => false,
        };
        if bytes > limit {
            return;
        }
        // A buffer made outside the pool adds to the footprint: it is kept only
        // where it fits the bound and the limit (it never displaces the pool's own
        // buffers).
        if !was_live
            && (s.live + s.pooled + bytes > footprint_bound(s.live_peak)
                || s.pooled + bytes > limit)
        {
            return;
        }
        evicted = s.shelve(v, limit);
        s.note_peaks();
    }
    EVICTIONS.fetch_add(evicted.len() as u64, Ordering::Relaxed);
    // Freed outside the lock.
    drop(evicted);
}

impl Shelves {
    /// Puts `v` on its shelf, first taking off the largest other pooled buffers
    /// while the pool would hold more than `limit` bytes with it (`v` itself fits:
    /// the caller checked); returns those, to be freed outside the lock.
    ///
    /// Room is made before `v` is shelved so that it is never its own victim:
    /// shelved first, a buffer of the pool's largest size class was evicted as soon
    /// as it came back, and a pool at its limit missed every request of that class
    /// (the 62 MB input gradients of `bench --ops --train`: a fresh mapping to
    /// page-fault each time).
    fn shelve<T: Send + 'static>(&mut self, v: Vec<T>, limit: usize) -> Vec<Box<dyn Any + Send>> {
        let (size, cap) = (std::mem::size_of::<T>(), v.capacity());
        let mut evicted = Vec::new();
        while self.pooled + cap * size > limit {
            let Some(b) = evict_largest(self) else {
                break;
            };
            evicted.push(b);
        }
        self.free
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Shelf {
                elem_bytes: size,
                by_cap: BTreeMap::new(),
            })
            .by_cap
            .entry(cap)
            .or_default()
            .push(Box::new(v));
        self.pooled += cap * size;
        evicted
    }
}

/// Takes the largest pooled buffer (of any type) off its shelf.
fn evict_largest(s: &mut Shelves) -> Option<Box<dyn Any + Send>> {
    let (ty, cap, bytes) = s
        .free
        .iter()
        .filter_map(|(&ty, sh)| {
            let (&cap, _) = sh.by_cap.last_key_value()?;
            Some((ty, cap, cap * sh.elem_bytes))
        })
        .max_by_key(|t| t.2)?;
    let by_cap = &mut s.free.get_mut(&ty)?.by_cap;
    let bufs = by_cap.get_mut(&cap)?;
    let b = bufs.pop();
    if bufs.is_empty() {
        by_cap.remove(&cap);
    }
    s.pooled -= bytes;
    b
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
    /// Per-thread reusable values by type: vectors of any element type (sort keys,
    /// index lists) and structs of them.
    static VECS: std::cell::RefCell<HashMap<TypeId, Box<dyn Any>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Runs `f` on this thread's empty vector of `T` with room for at least `cap`
/// elements, kept for the next call: temporaries such as sort keys stop allocating
/// once warm. A nested call for the same `T` gets a fresh vector.
pub fn with_vec<T: 'static, R>(cap: usize, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
    with_kept(|v: &mut Vec<T>| {
        v.clear();
        v.reserve(cap);
        let r = f(v);
        v.clear();
        r
    })
}

/// Runs `f` on this thread's value of type `S` (`S::default()` the first time), kept
/// for the next call as `f` leaves it: a struct of temporaries whose vectors keep
/// their capacity stops allocating once warm. A nested call for the same `S` gets a
/// fresh default.
pub fn with_kept<S: Default + 'static, R>(f: impl FnOnce(&mut S) -> R) -> R {
    let key = TypeId::of::<S>();
    let kept = VECS.with(|m| m.borrow_mut().remove(&key));
    let mut v: S = kept
        .and_then(|b| b.downcast::<S>().ok())
        .map_or_else(S::default, |b| *b);
    let r = f(&mut v);
    VECS.with(|m| m.borrow_mut().insert(key, Box::new(v)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes_and_odd_texts_give_none() {
        let m = "MemTotal:       24554112 kB\nMemFree:        22000000 kB\n";
        assert_eq!(mem_total_bytes(m), Some(24554112 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: 12 MB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: many kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal:\n"), None);
    }

    #[test]
    fn the_default_limit_is_a_quarter_of_memory_and_at_least_2_gib() {
        const GIB: usize = 1 << 30;
        assert_eq!(limit_for_memory(Some(24 * GIB)), 6 * GIB);
        assert_eq!(limit_for_memory(Some(9 * GIB)), 9 * GIB / 4);
        assert_eq!(limit_for_memory(Some(4 * GIB)), 2 * GIB);
        assert_eq!(limit_for_memory(Some(0)), 2 * GIB);
        assert_eq!(limit_for_memory(None), 2 * GIB);
        assert!(default_limit() >= 2 * GIB);
    }

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
    fn a_full_pool_keeps_the_buffer_given_back() {
        // A local pool of 4 MiB holding four 1 MiB buffers: a 2 MiB buffer (the
        // largest class) given back displaces two of them and stays.
        let mut s = Shelves::default();
        let limit = 4 << 20;
        for _ in 0..4 {
            assert!(s.shelve(vec![0u8; 1 << 20], limit).is_empty());
        }
        let big = vec![0u8; 2 << 20];
        let at = big.as_ptr();
        let evicted = s.shelve(big, limit);
        assert_eq!(evicted.len(), 2, "two 1 MiB buffers make room");
        assert_eq!(s.pooled, 4 << 20);
        let shelf = &s.free[&TypeId::of::<u8>()].by_cap;
        let kept = shelf[&(2 << 20)][0].downcast_ref::<Vec<u8>>().unwrap();
        assert_eq!(kept.as_ptr(), at, "the buffer given back is still pooled");
        assert_eq!(shelf[&(1 << 20)].len(), 2);
    }

    #[test]
    fn small_buffers_are_not_pooled() {
        let v = take::<f32>(16);
        give(v);
        assert_eq!(take::<f32>(16).len(), 16);
    }
}
