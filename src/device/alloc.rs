//! The layer between the ops and a driver backend: a stream-ordered caching
//! allocator and the per-thread [`Counters`].
//!
//! # Caching allocator
//!
//! Like PyTorch's CUDA caching allocator, a block a tensor no longer needs goes back
//! to a free list instead of the driver, and the next allocation of its size class
//! takes it. Reuse needs no wait: every backend has one stream, so all work queued
//! with the old block runs before any work queued with the new owner (stream order).
//! A training step after the first therefore allocates nothing from the driver.
//!
//! Size classes are four per power of two from 512 bytes up (512, 640, 768, 896,
//! 1024, 1280, ...), so a block wastes less than a fifth of itself. A request takes
//! a cached block of its own class only: then each class counts its blocks on its
//! own, and a step that repeats the requests of an earlier one (same classes, same
//! order of allocations and frees) finds every block it needs, since the cache then
//! holds at least the earlier step's most-in-use of every class. Had a request also
//! taken a cached block of up to twice its class (as until 2026-12), a block added
//! for one request could be taken by an earlier one in the next step, and the
//! misses settled over several steps (Runner, fixture model: 242, 105, 5, 2 then 0
//! driver blocks). A larger block (up to twice the class) still serves a request
//! when the driver is out of memory (before the cache is emptied) and during a
//! capture rather than a refused driver allocation. Sizes that vary between steps
//! (detection counts) give each class met its own blocks.
//!
//! State that outlives the step that creates it (optimizer momentum and staging
//! buffers, cached device tables and constants, the read-out buffers) is allocated
//! under [`long_lived`], from a pool of its own: taken from the shared cache, it
//! would hold blocks the first step's temporaries freed, and the second step would
//! need new ones from the driver. Objects of one step held into the next (the
//! previous step's gradients) have the same effect and are dropped at the step's
//! end. `KESTREL_ALLOC_TRACE=1` prints each driver allocation (class, pool, the
//! call sites in src/) to find what still misses.
//!
//! The pointer handed out is the *end* of the block (`block + class - round_up(bytes,
//! alignment)`): on the emulated device, whose driver blocks end at a guard page, a
//! kernel reading one element past its buffer still faults.
//!
//! Blocks go back to the driver only on [`GpuBackend::empty_cache`] or when the
//! driver runs out of memory (then the cache is emptied and the allocation retried).
//!
//! # Graph capture
//!
//! While a thread captures a graph ([`GpuBackend::begin_capture`]), its allocations
//! come from a pool private to that graph, as in PyTorch's graph pools: blocks freed
//! during the capture are reused by later allocations of the same capture (replay
//! runs in capture order, so that is stream-ordered reuse), and no block the graph
//! has used is handed to anyone else while the graph lives, since a replay writes
//! to it again. A block the private pool lacks may come from the shared cache; a
//! block that would need the driver is an error (warm the cache by running the
//! region once eagerly). When the graph is dropped its blocks return to the cache.
//!
//! Fresh memory is not zero-filled: [`GpuDevice::alloc_zeroed`] asks for a memset,
//! and every block handed out is first passed to [`GpuBackend::poison`] (the emulated
//! device fills it with all-ones bits: NaN, -1), so reliance on zeros fails tests.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use super::gpu::{Counters, GpuBackend, GpuBuffer, GraphExec, KernelArg, LaunchCfg, MemoryStats};
use crate::error::{Error, Result};

#[cfg(doc)]
use super::gpu::GpuDevice;

thread_local! {
    /// This thread's counts per device ordinal.
    static COUNTS: RefCell<HashMap<usize, Counters>> = RefCell::new(HashMap::new());
}

fn bump(ordinal: usize, f: impl FnOnce(&mut Counters)) {
    COUNTS.with(|c| f(c.borrow_mut().entry(ordinal).or_default()));
}

thread_local! {
    /// How many [`LongLived`] guards this thread holds.
    static LONG_LIVED: Cell<usize> = const { Cell::new(0) };
}

/// While the returned guard lives, this thread's device allocations are marked
/// long-lived: state that outlives the step that creates it (optimizer momentum
/// and staging buffers, cached constants and tables, the read-out buffers). They
/// come from a pool of their own, so the blocks a step's temporaries freed stay
/// for the temporaries of the next step (see the module docs). Nests; a marked
/// block that is dropped goes back to the long-lived pool.
pub fn long_lived() -> LongLived {
    LONG_LIVED.with(|d| d.set(d.get() + 1));
    LongLived(std::marker::PhantomData)
}

/// The guard of [`long_lived`] (not `Send`: the mark is per thread).
pub struct LongLived(std::marker::PhantomData<*const ()>);

impl Drop for LongLived {
    fn drop(&mut self) {
        LONG_LIVED.with(|d| d.set(d.get() - 1));
    }
}

fn is_long_lived() -> bool {
    LONG_LIVED.with(|d| d.get() > 0)
}

/// With `KESTREL_ALLOC_TRACE` set, print a driver allocation: its class, request,
/// pool, and the first call sites outside the device and tensor layers.
fn trace_miss(class: usize, bytes: usize, long: bool) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("KESTREL_ALLOC_TRACE").is_some()) {
        return;
    }
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let sites: Vec<&str> = bt
        .lines()
        .filter_map(|l| l.trim().strip_prefix("at ./src/"))
        .filter(|l| !l.starts_with("device/") && !l.starts_with("tensor/"))
        .take(4)
        .collect();
    let pool = if long { "long-lived" } else { "shared" };
    eprintln!(
        "driver alloc: class {class} for {bytes} bytes ({pool}) at {}",
        sites.join(" < ")
    );
}

/// The size class of a request: the smallest of 512 * 2^k * {4,5,6,7}/4 that holds it.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= 512 {
        return 512;
    }
    let octave = bytes.next_power_of_two() / 2; // the power of two below (or at) bytes
    let step = (octave / 4).max(1);
    bytes.div_ceil(step) * step
}

/// Free blocks by class (the shared cache, and the long-lived pool), and the byte
/// totals.
#[derive(Default)]
struct PoolState {
    free: BTreeMap<usize, Vec<GpuBuffer>>,
    long: BTreeMap<usize, Vec<GpuBuffer>>,
    stats: MemoryStats,
}

impl PoolState {
    /// Account a block of class `class` lent.
    fn lend(&mut self, class: usize) {
        self.stats.allocated += class as u64;
        self.stats.peak_allocated = self.stats.peak_allocated.max(self.stats.allocated);
    }

    /// The class of the cached block a request of class `class` gets, if any (see
    /// the module docs): a block of its own class; when `pressed` (the driver is
    /// out of memory, or a capture would otherwise need the driver) the smallest
    /// cached block up to twice the class.
    fn pick(&self, class: usize, pressed: bool) -> Option<usize> {
        let top = if pressed { 2 * class } else { class };
        self.free
            .range(class..=top)
            .find(|(_, v)| !v.is_empty())
            .map(|(&c, _)| c)
    }
}

/// The blocks of one captured graph (see the module docs): free ones by class;
/// `retired` once the graph is dropped, after which blocks go back to the cache.
#[derive(Default)]
struct PrivatePool {
    free: BTreeMap<usize, Vec<GpuBuffer>>,
    retired: bool,
}

/// One thread's capture in progress.
struct Capture {
    pool: Arc<Mutex<PrivatePool>>,
    /// The last kernel recorded, to say where a refused call came from.
    last_kernel: Option<String>,
}

/// A driver backend wrapped with the caching allocator and the counters. Built by
/// [`super::gpu::register_backend`] / [`super::gpu::device`]; ops only ever see this.
pub struct Managed {
    ordinal: usize,
    driver: Arc<dyn GpuBackend>,
    pool: Arc<Mutex<PoolState>>,
    captures: Mutex<HashMap<ThreadId, Capture>>,
}

/// One block lent to a tensor; back to the free list when the last clone drops
/// (the graph's private list if it was handed out during a capture).
struct Lent {
    block: Option<GpuBuffer>,
    class: usize,
    /// From the long-lived pool (and back to it).
    long: bool,
    pool: Arc<Mutex<PoolState>>,
    private: Option<Arc<Mutex<PrivatePool>>>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.stats.allocated -= self.class as u64;
            if self.long {
                p.long.entry(self.class).or_default().push(b);
                return;
            }
            if let Some(pr) = &self.private {
                let mut pr = pr.lock().unwrap_or_else(|e| e.into_inner());
                if !pr.retired {
                    pr.free.entry(self.class).or_default().push(b);
                    return;
                }
            }
            p.free.entry(self.class).or_default().push(b);
        }
    }
}

/// A graph captured through [`Managed`]: the driver's graph, the private pool it
/// keeps alive, and the counter of replays.
struct ManagedGraph {
    ordinal: usize,
    exec: Box<dyn GraphExec>,
    private: Arc<Mutex<PrivatePool>>,
    pool: Arc<Mutex<PoolState>>,
}

impl GraphExec for ManagedGraph {
    fn replay(&self) -> Result<()> {
        bump(self.ordinal, |c| c.graph_replays += 1);
        self.exec.replay()
    }
    fn nodes(&self) -> usize {
        self.exec.nodes()
    }
}

impl Drop for ManagedGraph {
    fn drop(&mut self) {
        let mut pr = self.private.lock().unwrap_or_else(|e| e.into_inner());
        pr.retired = true;
        let free = std::mem::take(&mut pr.free);
        drop(pr);
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for (class, blocks) in free {
            p.free.entry(class).or_default().extend(blocks);
        }
    }
}

impl Managed {
    /// Wrap `driver`, whose device is `Device::Cuda(ordinal)`.
    pub fn new(ordinal: usize, driver: Arc<dyn GpuBackend>) -> Managed {
        Managed {
            ordinal,
            driver,
            pool: Arc::new(Mutex::new(PoolState::default())),
            captures: Mutex::new(HashMap::new()),
        }
    }

    /// The calling thread's capture pool, if it is capturing.
    fn capture_pool(&self) -> Option<Arc<Mutex<PrivatePool>>> {
        let caps = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        caps.get(&std::thread::current().id())
            .map(|c| c.pool.clone())
    }

    /// Refuse `what` when the calling thread is capturing: the error names the call
    /// and the last kernel recorded before it.
    fn refuse_in_capture(&self, what: impl FnOnce() -> String) -> Result<()> {
        let caps = self.captures.lock().unwrap_or_else(|e| e.into_inner());
        match caps.get(&std::thread::current().id()) {
            None => Ok(()),
            Some(c) => Err(Error::invalid(
                "graph capture",
                format!(
                    "{} during capture (after kernel {}): a captured region must not {}",
                    what(),
                    c.last_kernel.as_deref().unwrap_or("none"),
                    "synchronise, read back, copy from the host or allocate from the driver"
                ),
            )),
        }
    }

    /// A free block of the capture's private pool, class `class` up to `max_class`.
    fn take_private(
        &self,
        pr: &Mutex<PrivatePool>,
        class: usize,
        max_class: usize,
    ) -> Option<(GpuBuffer, usize)> {
        let mut g = pr.lock().unwrap_or_else(|e| e.into_inner());
        let found = g
            .free
            .range_mut(class..=max_class)
            .find(|(_, v)| !v.is_empty())
            .map(|(&c, v)| (v.pop(), c));
        drop(g);
        match found {
            Some((Some(b), c)) => {
                let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                p.lend(c);
                Some((b, c))
            }
            _ => None,
        }
    }

    /// A cached block for a request of class `class` ([`PoolState::pick`]), if any.
    fn take_cached(&self, class: usize, pressed: bool) -> Option<(GpuBuffer, usize)> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let c = p.pick(class, pressed)?;
        let b = p.free.get_mut(&c)?.pop()?;
        p.lend(c);
        Some((b, c))
    }

    /// A block of the long-lived pool for a request of class `class`: its class
    /// first, else the smallest up to twice the class.
    fn take_long(&self, class: usize) -> Option<(GpuBuffer, usize)> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let (b, c) = p
            .long
            .range_mut(class..=2 * class)
            .find(|(_, v)| !v.is_empty())
            .and_then(|(&c, v)| Some((v.pop()?, c)))?;
        p.lend(c);
        Some((b, c))
    }

    /// A new block of `class` bytes from the driver; on failure the cache is given
    /// back and the allocation tried once more.
    fn driver_alloc(&self, class: usize) -> Result<GpuBuffer> {
        let b = match self.driver.alloc(class) {
            Ok(b) => b,
            Err(_) => {
                self.empty_cache();
                self.driver.alloc(class)?
            }
        };
        self.count_driver_alloc(class);
        Ok(b)
    }

    /// Count a new block of `class` bytes from the driver, lent.
    fn count_driver_alloc(&self, class: usize) {
        bump(self.ordinal, |c| {
            c.driver_allocs += 1;
            c.driver_alloc_bytes += class as u64;
        });
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.stats.reserved += class as u64;
        p.stats.peak_reserved = p.stats.peak_reserved.max(p.stats.reserved);
        p.lend(class);
    }
}

impl GpuBackend for Managed {
    fn name(&self) -> String {
        self.driver.name()
    }

    fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        let align = self.driver.alignment();
        let used = bytes.max(1).div_ceil(align) * align;
        let class = size_class(used).next_multiple_of(align);
        let private = self.capture_pool();
        let long = private.is_none() && is_long_lived();
        let hit = match &private {
            // A block of the request's class from the private pool or the shared
            // cache, as an eager run takes one from its one cache: a larger block
            // taken first could leave a later, larger request of the same region
            // without one (a driver allocation the warm-up never needed, refused
            // in capture). Only rather than a refused driver allocation, the
            // smallest block up to twice the class, private first.
            Some(pr) => self
                .take_private(pr, class, class)
                .or_else(|| self.take_cached(class, false))
                .or_else(|| self.take_private(pr, class, 2 * class))
                .or_else(|| self.take_cached(class, true)),
            None if long => self.take_long(class),
            None => self.take_cached(class, false),
        };
        let (block, class) = match hit {
            Some(hit) => {
                bump(self.ordinal, |c| c.cached_allocs += 1);
                hit
            }
            None => {
                self.refuse_in_capture(|| {
                    format!("a driver allocation of {bytes} bytes (cache miss)")
                })?;
                trace_miss(class, bytes, long);
                match self.driver.alloc(class) {
                    Ok(b) => {
                        self.count_driver_alloc(class);
                        (b, class)
                    }
                    // Out of driver memory: a cached block up to twice the class,
                    // else the cache back to the driver and once more.
                    Err(_) => match self.take_cached(class, true) {
                        Some(hit) => {
                            bump(self.ordinal, |c| c.cached_allocs += 1);
                            hit
                        }
                        None => (self.driver_alloc(class)?, class),
                    },
                }
            }
        };
        // The end of the block: see the module docs (guard pages).
        let ptr = block.ptr() + (class - used) as u64;
        let lent = Lent {
            block: Some(block),
            class,
            long,
            pool: self.pool.clone(),
            private,
        };
        let buf = GpuBuffer::new(ptr, bytes, Arc::new(lent));
        self.driver.poison(&buf)?;
        Ok(buf)
    }

    fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        self.refuse_in_capture(|| format!("a host-to-device copy of {} bytes", src.len()))?;
        bump(self.ordinal, |c| {
            c.htod += 1;
            c.htod_bytes += src.len() as u64;
        });
        self.driver.copy_htod(src, dst)
    }

    fn copy_htod_pinned(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        self.refuse_in_capture(|| format!("a host-to-device copy of {} bytes", src.len()))?;
        bump(self.ordinal, |c| {
            c.htod += 1;
            c.htod_pinned += 1;
            c.htod_bytes += src.len() as u64;
        });
        self.driver.copy_htod_pinned(src, dst)
    }

    fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()> {
        self.refuse_in_capture(|| format!("a device-to-host copy of {} bytes", dst.len()))?;
        bump(self.ordinal, |c| {
            c.dtoh += 1;
            c.dtoh_bytes += dst.len() as u64;
        });
        self.driver.copy_dtoh(src, dst)
    }

    fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()> {
        bump(self.ordinal, |c| c.dtod += 1);
        self.driver.copy_dtod(src, dst, bytes)
    }

    fn memset(&self, dst: &GpuBuffer, value: u8) -> Result<()> {
        bump(self.ordinal, |c| c.memsets += 1);
        self.driver.memset(dst, value)
    }

    fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()> {
        bump(self.ordinal, |c| c.launches += 1);
        {
            let mut caps = self.captures.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = caps.get_mut(&std::thread::current().id()) {
                c.last_kernel = Some(kernel.to_string());
            }
        }
        self.driver.launch(kernel, cfg, args)
    }

    fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture(|| "a synchronisation".to_string())?;
        bump(self.ordinal, |c| c.syncs += 1);
        self.driver.synchronize()
    }

    fn alignment(&self) -> usize {
        self.driver.alignment()
    }

    fn counters(&self) -> Counters {
        COUNTS.with(|c| c.borrow().get(&self.ordinal).copied().unwrap_or_default())
    }

    fn memory(&self) -> MemoryStats {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    fn reset_peak_memory(&self) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.stats.peak_allocated = p.stats.allocated;
        p.stats.peak_reserved = p.stats.reserved;
    }

    fn raise_peak_memory(&self, allocated: u64, reserved: u64) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.stats.peak_allocated = p.stats.peak_allocated.max(allocated);
        p.stats.peak_reserved = p.stats.peak_reserved.max(reserved);
    }

    fn empty_cache(&self) {
        let freed: Vec<(usize, Vec<GpuBuffer>)> = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let mut all: Vec<(usize, Vec<GpuBuffer>)> = std::mem::take(&mut p.free)
                .into_iter()
                .chain(std::mem::take(&mut p.long))
                .collect();
            all.retain(|(_, v)| !v.is_empty());
            let bytes: usize = all.iter().map(|(c, v)| c * v.len()).sum();
            p.stats.reserved -= bytes as u64;
            all
        };
        for (class, blocks) in freed {
            let n = blocks.len() as u64;
            bump(self.ordinal, |c| {
                c.driver_frees += n;
                c.driver_free_bytes += n * class as u64;
            });
            drop(blocks); // the driver backend's owner frees each block
        }
    }

    fn begin_capture(&self) -> Result<()> {
        let id = std::thread::current().id();
        if self.capture_pool().is_some() {
            return Err(Error::invalid(
                "begin_capture",
                "this thread is already capturing on this device",
            ));
        }
        self.driver.begin_capture()?;
        let cap = Capture {
            pool: Arc::new(Mutex::new(PrivatePool::default())),
            last_kernel: None,
        };
        self.captures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, cap);
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        let id = std::thread::current().id();
        let cap = self
            .captures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .ok_or_else(|| Error::invalid("end_capture", "this thread is not capturing"))?;
        // Should the driver fail, the graph is built around a placeholder and
        // dropped, which gives the private blocks back to the cache.
        let (exec, result): (Box<dyn GraphExec>, _) = match self.driver.end_capture() {
            Ok(e) => (e, Ok(())),
            Err(e) => (Box::new(NoGraph), Err(e)),
        };
        let graph = ManagedGraph {
            ordinal: self.ordinal,
            exec,
            private: cap.pool,
            pool: self.pool.clone(),
        };
        result.map(|()| Box::new(graph) as Box<dyn GraphExec>)
    }

    fn is_capturing(&self) -> bool {
        self.capture_pool().is_some()
    }

    fn cuda_stream(&self) -> Option<usize> {
        self.driver.cuda_stream()
    }
}

/// Placeholder exec while the driver's graph is being built.
struct NoGraph;

impl GraphExec for NoGraph {
    fn replay(&self) -> Result<()> {
        Err(Error::invalid("graph replay", "the graph was not built"))
    }
    fn nodes(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::{long_lived, size_class, Managed};
    use crate::device::gpu::{GpuBackend, GpuBuffer, KernelArg, LaunchCfg};
    use crate::error::{Error, Result};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A driver that hands out addresses and counts its allocations; `limit`
    /// allocations at most (then out of memory).
    struct Fake {
        next: AtomicU64,
        allocs: AtomicUsize,
        limit: usize,
    }

    impl GpuBackend for Fake {
        fn name(&self) -> String {
            "fake".into()
        }
        fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
            if self.allocs.load(Ordering::SeqCst) >= self.limit {
                return Err(Error::invalid("fake", "out of memory"));
            }
            self.allocs.fetch_add(1, Ordering::SeqCst);
            let p = self.next.fetch_add(bytes as u64 + 4096, Ordering::SeqCst);
            Ok(GpuBuffer::new(p, bytes, Arc::new(())))
        }
        fn copy_htod(&self, _: &[u8], _: &GpuBuffer) -> Result<()> {
            Ok(())
        }
        fn copy_dtoh(&self, _: &GpuBuffer, _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn copy_dtod(&self, _: &GpuBuffer, _: &GpuBuffer, _: usize) -> Result<()> {
            Ok(())
        }
        fn memset(&self, _: &GpuBuffer, _: u8) -> Result<()> {
            Ok(())
        }
        fn launch(&self, _: &str, _: &LaunchCfg, _: &[KernelArg]) -> Result<()> {
            Ok(())
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
    }

    fn managed(limit: usize) -> (Managed, Arc<Fake>) {
        let fake = Arc::new(Fake {
            next: AtomicU64::new(1 << 20),
            allocs: AtomicUsize::new(0),
            limit,
        });
        // An ordinal no real device uses: the counters are per ordinal.
        (Managed::new(977, fake.clone()), fake)
    }

    /// One step of a made-up workload: allocations of sizes that fall in
    /// neighbouring classes (so a block of one class could serve a smaller
    /// request), freed in a shuffled order; in the first step, `keep` marks
    /// some as state that outlives the step (kept in `state`), like momentum.
    fn step(m: &Managed, state: &mut Vec<GpuBuffer>, keep: Option<bool>) {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut live: Vec<GpuBuffer> = Vec::new();
        for i in 0..600 {
            if !live.is_empty() && rand(5) < 2 {
                let k = rand(live.len() as u64) as usize;
                live.swap_remove(k);
            }
            let bytes = 400 + rand(6000) as usize;
            if i % 37 == 5 {
                if let Some(mark) = keep {
                    let _long = mark.then(long_lived);
                    state.push(m.alloc(bytes).unwrap());
                }
                continue;
            }
            live.push(m.alloc(bytes).unwrap());
        }
    }

    /// Driver allocations of steps 1, 2, 3 of [`step`], state marked or not.
    fn misses(mark: bool) -> Vec<usize> {
        let (m, fake) = managed(usize::MAX);
        let mut state = Vec::new();
        let mut out = Vec::new();
        for s in 0..3 {
            let before = fake.allocs.load(Ordering::SeqCst);
            step(&m, &mut state, (s == 0).then_some(mark));
            out.push(fake.allocs.load(Ordering::SeqCst) - before);
        }
        assert_eq!(state.len(), 600 / 37 + 1);
        out
    }

    #[test]
    fn a_repeated_step_takes_nothing_from_the_driver_after_one_warm_up_step() {
        let marked = misses(true);
        assert!(marked[0] > 0, "{marked:?}");
        assert_eq!(&marked[1..], &[0, 0], "driver allocations per step");
        // Unmarked, the state takes blocks the first step's temporaries freed, and
        // the second step needs new ones (what the mark is for).
        let unmarked = misses(false);
        assert!(unmarked[1] > 0, "{unmarked:?}");
    }

    #[test]
    fn blocks_go_back_to_their_own_pool_and_are_reused_in_stream_order() {
        let (m, fake) = managed(usize::MAX);
        let a = m.alloc(3000).unwrap();
        let at = a.ptr();
        drop(a);
        // Same class: the same block (one stream, so work queued with the old
        // owner runs first).
        let b = m.alloc(2700).unwrap();
        assert_eq!(b.ptr(), at + 256, "the end of the same block (aligned)");
        drop(b);
        // A long-lived request does not take the shared block...
        let l = {
            let _long = long_lived();
            m.alloc(3000).unwrap()
        };
        assert_eq!(fake.allocs.load(Ordering::SeqCst), 2);
        let lp = l.ptr();
        drop(l);
        // ...and its block goes back to the long-lived pool, not to the shared one.
        let t = m.alloc(3000).unwrap();
        assert_eq!(t.ptr(), at);
        let l = {
            let _long = long_lived();
            m.alloc(3000).unwrap()
        };
        assert_eq!(l.ptr(), lp);
        assert_eq!(fake.allocs.load(Ordering::SeqCst), 2);
        drop((t, l));
        let mem = m.memory();
        assert_eq!(mem.allocated, 0);
        assert_eq!(mem.reserved, 2 * size_class(3000) as u64);
        m.empty_cache();
        assert_eq!(m.memory().reserved, 0);
    }

    #[test]
    fn a_larger_cached_block_serves_a_request_only_when_the_driver_is_out_of_memory() {
        let (m, fake) = managed(2);
        drop(m.alloc(1024).unwrap());
        // Room in the driver: a block of the request's own class.
        let small = m.alloc(600).unwrap();
        assert_eq!(fake.allocs.load(Ordering::SeqCst), 2);
        // The driver is full: the cached 1024-byte block (up to twice the class).
        let other = m.alloc(600).unwrap();
        assert_eq!(fake.allocs.load(Ordering::SeqCst), 2);
        assert_eq!(m.memory().allocated, 768 + 1024, "600 aligned to 768");
        // Nothing cached fits and the driver is full: an error, not a panic.
        assert!(m.alloc(600).is_err());
        drop((small, other));
    }

    #[test]
    fn size_classes_hold_the_request_and_waste_under_a_fifth() {
        for bytes in [
            1usize,
            512,
            513,
            700,
            1000,
            1024,
            1025,
            4097,
            1 << 20,
            3_000_001,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c <= 512 || (c - bytes) * 5 < c, "{bytes} -> {c}");
        }
        assert_eq!(size_class(513), 640);
        assert_eq!(size_class(1025), 1280);
    }
}
