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
//! 1024, 1280, ...), so a block wastes less than a fifth of itself, and a request
//! may take a cached block of up to twice its class: sizes that vary a little
//! between steps (proposal and detection counts) still hit the cache. The pointer
//! handed out is the *end* of the block (`block + class - round_up(bytes,
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

use std::cell::RefCell;
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

/// The size class of a request: the smallest of 512 * 2^k * {4,5,6,7}/4 that holds it.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= 512 {
        return 512;
    }
    let octave = bytes.next_power_of_two() / 2; // the power of two below (or at) bytes
    let step = (octave / 4).max(1);
    bytes.div_ceil(step) * step
}

/// Free blocks by class, and the byte totals.
#[derive(Default)]
struct PoolState {
    free: BTreeMap<usize, Vec<GpuBuffer>>,
    stats: MemoryStats,
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
    pool: Arc<Mutex<PoolState>>,
    private: Option<Arc<Mutex<PrivatePool>>>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.stats.allocated -= self.class as u64;
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
                p.stats.allocated += c as u64;
                p.stats.peak_allocated = p.stats.peak_allocated.max(p.stats.allocated);
                Some((b, c))
            }
            _ => None,
        }
    }

    /// The class of the block [`Managed::take_cached`] would hand out, if any.
    fn smallest_cached(&self, class: usize) -> Option<usize> {
        let p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.free
            .range(class..=2 * class)
            .find(|(_, v)| !v.is_empty())
            .map(|(&c, _)| c)
    }

    /// A cached block of class `class` up to `2 * class`, if any.
    fn take_cached(&self, class: usize) -> Option<(GpuBuffer, usize)> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let found = p
            .free
            .range_mut(class..=2 * class)
            .find(|(_, v)| !v.is_empty())
            .map(|(&c, v)| (v.pop(), c));
        match found {
            Some((Some(b), c)) => {
                p.stats.allocated += c as u64;
                p.stats.peak_allocated = p.stats.peak_allocated.max(p.stats.allocated);
                Some((b, c))
            }
            _ => None,
        }
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
        bump(self.ordinal, |c| {
            c.driver_allocs += 1;
            c.driver_alloc_bytes += class as u64;
        });
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut p.stats;
        s.reserved += class as u64;
        s.peak_reserved = s.peak_reserved.max(s.reserved);
        s.allocated += class as u64;
        s.peak_allocated = s.peak_allocated.max(s.allocated);
        Ok(b)
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
        let hit = match &private {
            // The smallest fitting block of the private pool and the shared cache
            // together, as an eager run picks from its one cache: preferring any
            // private block could give a request a larger block that a later, larger
            // request of the same region then lacks (a driver allocation the warm-up
            // never needed, refused in capture).
            Some(pr) => {
                let shared = self.smallest_cached(class).unwrap_or(2 * class);
                self.take_private(pr, class, shared)
                    .or_else(|| self.take_cached(class))
            }
            None => self.take_cached(class),
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
                (self.driver_alloc(class)?, class)
            }
        };
        // The end of the block: see the module docs (guard pages).
        let ptr = block.ptr() + (class - used) as u64;
        let lent = Lent {
            block: Some(block),
            class,
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
            let all = std::mem::take(&mut p.free);
            let bytes: usize = all.iter().map(|(c, v)| c * v.len()).sum();
            p.stats.reserved -= bytes as u64;
            all.into_iter().collect()
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
    use super::size_class;

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
