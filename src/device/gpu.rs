//! The launch interface: everything the CUDA code paths of the ops need from a device.
//!
//! Ops never call cudarc. They allocate [`GpuBuffer`]s, copy, and launch kernels by
//! name through a [`GpuBackend`]. [`super::cuda::CudaBackend`] implements it with the
//! CUDA driver; an emulated device (host memory, kernels compiled as C++) implements
//! the same trait, so the same launch code runs on machines without a GPU.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// A device allocation: a raw device address plus the object that keeps it alive.
/// Cloning shares the allocation.
#[derive(Clone)]
pub struct GpuBuffer {
    ptr: u64,
    bytes: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl GpuBuffer {
    /// Wrap an address owned by `owner` (freed when the last clone drops).
    pub fn new(ptr: u64, bytes: usize, owner: Arc<dyn Any + Send + Sync>) -> Self {
        GpuBuffer {
            ptr,
            bytes,
            _owner: owner,
        }
    }
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Whether this handle is the only one on its allocation (no clone, no view
    /// into it, no cached table holds it): then writing to it changes nothing
    /// anyone else can see.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self._owner) == 1
    }
    /// A kernel argument pointing at this buffer.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr {
            ptr: self.ptr,
            bytes: self.bytes,
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// One kernel parameter, passed by value as `cuLaunchKernel` expects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer; `bytes` is the size of the allocation behind it, for
    /// launch-time checks on emulated devices.
    Ptr {
        /// The device address.
        ptr: u64,
        /// Size in bytes of the allocation behind `ptr`.
        bytes: usize,
    },
    /// A CUDA `int`.
    I32(i32),
    /// A CUDA `unsigned int`.
    U32(u32),
    /// A CUDA `long long` (64-bit signed).
    I64(i64),
    /// A CUDA `float`.
    F32(f32),
    /// A CUDA `double`.
    F64(f64),
}

/// Grid and block dimensions of a launch, and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    /// Blocks per grid `(x, y, z)` (`gridDim`).
    pub grid: (u32, u32, u32),
    /// Threads per block `(x, y, z)` (`blockDim`).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// A 1-D launch with `threads` threads per block covering `n` elements.
    pub fn linear(n: usize, threads: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).clamp(1, i32::MAX as usize) as u32;
        LaunchCfg {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
    /// A 1-D launch of 256-thread blocks covering `n` elements (grid-stride kernels
    /// cope with `n` beyond the grid).
    pub fn for_elems(n: usize) -> Self {
        let blocks = n.div_ceil(256).clamp(1, 65535 * 16) as u32;
        LaunchCfg {
            grid: (blocks, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// What a device must do for the CUDA code paths. One implementation drives the
/// CUDA driver; another emulates a device on the host.
///
/// A backend is the *driver*: its `alloc` goes to the driver every time. The
/// [`GpuDevice`] handed to the ops wraps it in a [`super::alloc::Managed`] backend
/// that counts every call ([`Counters`]) and serves `alloc` from a caching allocator,
/// so ops always see the managed one.
pub trait GpuBackend: Send + Sync {
    /// Human-readable name ("NVIDIA H100 80GB HBM3 (sm_90)", "emulated").
    fn name(&self) -> String;
    /// An allocation of `bytes` bytes. Its contents are unspecified: ask for zeros
    /// with [`GpuDevice::alloc_zeroed`] (or [`GpuBackend::memset`]).
    fn alloc(&self, bytes: usize) -> Result<GpuBuffer>;
    /// Copy host bytes into the start of `dst`.
    fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()>;
    /// Copy host bytes into the start of `dst` through page-locked (pinned) staging
    /// memory, asynchronously: the call returns once `src` has been copied into the
    /// staging buffer, the transfer itself is queued on the stream (CUDA:
    /// `cuMemcpyHtoDAsync` from a pinned buffer, so it overlaps with kernels already
    /// queued). Counted as one host-to-device copy and one pinned copy. Backends
    /// without pinned memory (the default) copy as [`GpuBackend::copy_htod`] does.
    fn copy_htod_pinned(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        self.copy_htod(src, dst)
    }
    /// Copy the first `dst.len()` bytes of `src` to the host (waits for prior work).
    fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()>;
    /// Copy `bytes` bytes from `src` to `dst`.
    fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()>;
    /// Set every byte of `dst` to `value` (stream-ordered, like `cuMemsetD8Async`).
    fn memset(&self, dst: &GpuBuffer, value: u8) -> Result<()>;
    /// Launch the `extern "C" __global__` entry `kernel` (see `kestrel kernels`).
    fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()>;
    /// Wait for all launched work.
    fn synchronize(&self) -> Result<()>;
    /// Alignment of the addresses handed to kernels, bytes (a power of two).
    fn alignment(&self) -> usize {
        256
    }
    /// Called on every block the caching allocator hands out, fresh or reused. The
    /// emulated device fills it with a poison pattern (all bits set: NaN as f32 and
    /// f64, -1 as i64) so a kernel that relies on zeroed memory fails its tests; a
    /// GPU leaves it alone.
    fn poison(&self, _buf: &GpuBuffer) -> Result<()> {
        Ok(())
    }
    /// Counts of this thread's calls since the thread started (zero for a bare
    /// driver backend; the managed wrapper counts).
    fn counters(&self) -> Counters {
        Counters::default()
    }
    /// Bytes held in use and from the driver (zero for a bare driver backend).
    fn memory(&self) -> MemoryStats {
        MemoryStats::default()
    }
    /// Start the peak figures of [`GpuBackend::memory`] again from the current use.
    fn reset_peak_memory(&self) {}
    /// Raise the peak figures of [`GpuBackend::memory`] to at least `allocated` and
    /// `reserved` bytes (restores an enclosing peak after a nested measurement,
    /// [`super::op_memory`]).
    fn raise_peak_memory(&self, _allocated: u64, _reserved: u64) {}
    /// Give every cached, unused block back to the driver.
    fn empty_cache(&self) {}
    /// Start capturing this thread's work into a graph instead of running it (CUDA
    /// stream capture). Until [`GpuBackend::end_capture`], launches, memsets and
    /// device-to-device copies are recorded; a synchronisation, a device-to-host or
    /// host-to-device copy, or an allocation the caching allocator cannot serve
    /// without the driver is an error that names it. Backends without graphs refuse.
    fn begin_capture(&self) -> Result<()> {
        Err(Error::invalid(
            "begin_capture",
            format!("{} does not support graph capture", self.name()),
        ))
    }
    /// End this thread's capture and return the graph, ready to replay.
    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        Err(Error::invalid("end_capture", "no capture in progress"))
    }
    /// Whether the calling thread is capturing on this device.
    fn is_capturing(&self) -> bool {
        false
    }
    /// The raw `CUstream` the backend queues its work on, as an integer, for code
    /// that must order other streams against it with events (NCCL's communication
    /// stream, `kestrel::dist`). `None` for backends without a CUDA stream.
    fn cuda_stream(&self) -> Option<usize> {
        None
    }
}

/// A captured, instantiated graph (see [`GpuBackend::begin_capture`]): replaying it
/// queues the recorded work again, on the same buffers, with the same arguments.
pub trait GraphExec: Send + Sync {
    /// Queue every recorded node in capture order (one graph launch).
    fn replay(&self) -> Result<()>;
    /// Number of recorded nodes (kernel launches, memsets, device copies).
    fn nodes(&self) -> usize;
}

/// How much device work a thread has asked for. Every backend's calls are counted
/// per thread and per device (the managed wrapper of [`GpuDevice`] counts them), so
/// a test or a bench reads exactly what its own code did:
/// `let c = dev.counters(); ...; c.delta()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Allocations from the driver (misses of the caching allocator).
    pub driver_allocs: u64,
    /// Bytes of those allocations.
    pub driver_alloc_bytes: u64,
    /// Blocks given back to the driver.
    pub driver_frees: u64,
    /// Bytes of those blocks.
    pub driver_free_bytes: u64,
    /// Allocations served from the cache without the driver.
    pub cached_allocs: u64,
    /// Memsets (zero-filled allocations included).
    pub memsets: u64,
    /// Kernel launches.
    pub launches: u64,
    /// Host-to-device copies.
    pub htod: u64,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Device-to-host copies (each waits for the stream: a read-back is a sync).
    pub dtoh: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
    /// Device-to-device copies.
    pub dtod: u64,
    /// Explicit synchronisations (not counting the wait inside each `dtoh`).
    pub syncs: u64,
    /// Of the `htod` copies, those staged through pinned memory (asynchronous).
    pub htod_pinned: u64,
    /// Graph replays (each one launch of a whole captured graph; the kernels it
    /// runs are not counted in `launches`).
    pub graph_replays: u64,
}

impl Counters {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            driver_allocs: self.driver_allocs - earlier.driver_allocs,
            driver_alloc_bytes: self.driver_alloc_bytes - earlier.driver_alloc_bytes,
            driver_frees: self.driver_frees - earlier.driver_frees,
            driver_free_bytes: self.driver_free_bytes - earlier.driver_free_bytes,
            cached_allocs: self.cached_allocs - earlier.cached_allocs,
            memsets: self.memsets - earlier.memsets,
            launches: self.launches - earlier.launches,
            htod: self.htod - earlier.htod,
            htod_bytes: self.htod_bytes - earlier.htod_bytes,
            dtoh: self.dtoh - earlier.dtoh,
            dtoh_bytes: self.dtoh_bytes - earlier.dtoh_bytes,
            dtod: self.dtod - earlier.dtod,
            syncs: self.syncs - earlier.syncs,
            htod_pinned: self.htod_pinned - earlier.htod_pinned,
            graph_replays: self.graph_replays - earlier.graph_replays,
        }
    }

    /// Field-by-field sum.
    pub fn plus(&self, o: &Counters) -> Counters {
        Counters {
            driver_allocs: self.driver_allocs + o.driver_allocs,
            driver_alloc_bytes: self.driver_alloc_bytes + o.driver_alloc_bytes,
            driver_frees: self.driver_frees + o.driver_frees,
            driver_free_bytes: self.driver_free_bytes + o.driver_free_bytes,
            cached_allocs: self.cached_allocs + o.cached_allocs,
            memsets: self.memsets + o.memsets,
            launches: self.launches + o.launches,
            htod: self.htod + o.htod,
            htod_bytes: self.htod_bytes + o.htod_bytes,
            dtoh: self.dtoh + o.dtoh,
            dtoh_bytes: self.dtoh_bytes + o.dtoh_bytes,
            dtod: self.dtod + o.dtod,
            syncs: self.syncs + o.syncs,
            htod_pinned: self.htod_pinned + o.htod_pinned,
            graph_replays: self.graph_replays + o.graph_replays,
        }
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "launches {}, driver allocs {} ({} B), driver frees {}, cached allocs {}, memsets {}, htod {} ({} B, {} pinned), dtoh {} ({} B), dtod {}, syncs {}, graph replays {}",
            self.launches,
            self.driver_allocs,
            self.driver_alloc_bytes,
            self.driver_frees,
            self.cached_allocs,
            self.memsets,
            self.htod,
            self.htod_bytes,
            self.htod_pinned,
            self.dtoh,
            self.dtoh_bytes,
            self.dtod,
            self.syncs,
            self.graph_replays
        )
    }
}

/// A scoped reader of one thread's [`Counters`] on one device: what was counted
/// between [`GpuDevice::counters`] (or [`super::Device::counters`]) and
/// [`CounterScope::delta`]. Only the calling thread's work is seen, so tests running
/// in parallel do not disturb each other.
#[derive(Clone)]
pub struct CounterScope {
    backend: Option<Arc<dyn GpuBackend>>,
    start: Counters,
}

impl CounterScope {
    /// A scope that always reads zero (the CPU).
    pub fn none() -> CounterScope {
        CounterScope {
            backend: None,
            start: Counters::default(),
        }
    }
    /// What this thread did on the device since the scope was opened (or reset).
    pub fn delta(&self) -> Counters {
        match &self.backend {
            Some(b) => b.counters().since(&self.start),
            None => Counters::default(),
        }
    }
    /// Start counting again from now.
    pub fn reset(&mut self) {
        if let Some(b) = &self.backend {
            self.start = b.counters();
        }
    }
}

/// Device memory of the caching allocator, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of blocks handed to tensors and not yet dropped (block sizes, as
    /// PyTorch's `memory_allocated`).
    pub allocated: u64,
    /// Highest `allocated` since the device opened or the last reset.
    pub peak_allocated: u64,
    /// Bytes held from the driver (in use or cached).
    pub reserved: u64,
    /// Highest `reserved` since the device opened or the last reset.
    pub peak_reserved: u64,
}

/// A handle to an opened GPU: its ordinal and backend.
#[derive(Clone)]
pub struct GpuDevice {
    /// The device's ordinal (`cuda:N`).
    pub ordinal: usize,
    /// The backend ops launch through: the managed (counting, caching) wrapper of the driver.
    pub backend: Arc<dyn GpuBackend>,
}

impl GpuDevice {
    /// An allocation of `bytes` bytes from the caching allocator; contents
    /// unspecified (poisoned on the emulated device).
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        self.backend.alloc(bytes)
    }
    /// A zero-filled allocation (one memset): only for kernels that accumulate into
    /// their output or leave some of it unwritten.
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<GpuBuffer> {
        let b = self.backend.alloc(bytes)?;
        self.backend.memset(&b, 0)?;
        Ok(b)
    }
    /// A device copy of the small, immutable host table `bytes` (kernel metadata
    /// such as shapes and strides), uploaded on first use and kept for the process,
    /// keyed by content: later calls with the same bytes cost no copy. So a region
    /// run once eagerly can then be captured as a graph (where a host copy is
    /// refused). Only for tables of a few hundred bytes that recur (one per distinct
    /// shape); never for data.
    pub fn constant(&self, bytes: &[u8]) -> Result<GpuBuffer> {
        // Keyed by the backend object (an ordinal may be re-registered with another
        // backend); the entry holds the backend so its address is never reused.
        type Tables = Mutex<HashMap<(usize, Vec<u8>), (GpuBuffer, Arc<dyn GpuBackend>)>>;
        static TABLES: OnceLock<Tables> = OnceLock::new();
        let tables = TABLES.get_or_init(|| Mutex::new(HashMap::new()));
        let key = (
            Arc::as_ptr(&self.backend) as *const () as usize,
            bytes.to_vec(),
        );
        if let Some((b, _)) = tables.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(b.clone());
        }
        let b = {
            let _long = super::alloc::long_lived();
            self.backend.alloc(bytes.len())?
        };
        self.backend.copy_htod(bytes, &b)?;
        tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (b.clone(), self.backend.clone()));
        Ok(b)
    }
    /// Launch `kernel` (see [`GpuBackend::launch`]).
    pub fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KernelArg]) -> Result<()> {
        self.backend.launch(kernel, &cfg, args)
    }
    /// Open a scoped reader of this thread's counters on this device.
    pub fn counters(&self) -> CounterScope {
        CounterScope {
            backend: Some(self.backend.clone()),
            start: self.backend.counters(),
        }
    }
    /// Memory held by the caching allocator.
    pub fn memory(&self) -> MemoryStats {
        self.backend.memory()
    }
    /// Restart the peaks of [`GpuDevice::memory`] from the current use.
    pub fn reset_peak_memory(&self) {
        self.backend.reset_peak_memory()
    }
    /// Give every cached, unused block back to the driver.
    pub fn empty_cache(&self) {
        self.backend.empty_cache()
    }
    /// Wrap a driver backend in the counting, caching layer the ops use.
    fn managed(ordinal: usize, driver: Arc<dyn GpuBackend>) -> GpuDevice {
        GpuDevice {
            ordinal,
            backend: Arc::new(super::alloc::Managed::new(ordinal, driver)),
        }
    }
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuDevice(cuda:{}, {})",
            self.ordinal,
            self.backend.name()
        )
    }
}

/// Opens a backend for an ordinal; replaced to route `Device::Cuda` elsewhere.
pub type BackendFactory = fn(usize) -> Result<Arc<dyn GpuBackend>>;

/// The factory in use (if replaced) and the devices opened or registered so far.
type Registry = Mutex<(Option<BackendFactory>, HashMap<usize, GpuDevice>)>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| Mutex::new((None, HashMap::new())))
}

/// Route every later `Device::Cuda(n)` to `factory` instead of the CUDA driver (the
/// emulated device uses this). Devices already opened are forgotten.
pub fn set_backend_factory(factory: BackendFactory) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.0 = Some(factory);
    reg.1.clear();
}

/// Make `Device::Cuda(ordinal)` mean `backend` for the rest of the process (replacing
/// whatever that ordinal was), without touching any other ordinal: real devices and
/// an emulated one (see [`super::emu`], which uses a reserved ordinal) live side by
/// side. Returns the device handle.
pub fn register_backend(ordinal: usize, backend: Arc<dyn GpuBackend>) -> GpuDevice {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    let dev = GpuDevice::managed(ordinal, backend);
    reg.1.insert(ordinal, dev.clone());
    dev
}

/// The device registered under `ordinal`, registering `backend()` there first if
/// nothing is: one lock for both, so threads racing to first use all get the same
/// device (two handles for one ordinal would each have their own cache and capture
/// state). `backend` runs under that lock: it must not open or register devices.
pub fn register_backend_once(
    ordinal: usize,
    backend: impl FnOnce() -> Arc<dyn GpuBackend>,
) -> GpuDevice {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.1
        .entry(ordinal)
        .or_insert_with(|| GpuDevice::managed(ordinal, backend()))
        .clone()
}

/// The device registered or opened under `ordinal`, if any (opens nothing).
pub fn registered(ordinal: usize) -> Option<GpuDevice> {
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.1.get(&ordinal).cloned()
}

/// The device for ordinal `n`, opened on first use and cached for the process.
/// Errors (never panics) when there is no driver, no GPU or no such ordinal.
pub fn device(n: usize) -> Result<GpuDevice> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = reg.1.get(&n) {
        return Ok(d.clone());
    }
    let backend = match reg.0 {
        Some(factory) => factory(n)?,
        None => super::cuda::CudaBackend::open(n)? as Arc<dyn GpuBackend>,
    };
    let dev = GpuDevice::managed(n, backend);
    reg.1.insert(n, dev.clone());
    Ok(dev)
}

/// Check that `cfg` is a launch a CUDA device accepts (shared by every backend).
pub fn validate_launch(kernel: &str, cfg: &LaunchCfg) -> Result<()> {
    let (bx, by, bz) = cfg.block;
    let threads = bx as u64 * by as u64 * bz as u64;
    let err = |msg: String| {
        Err(Error::Launch {
            kernel: kernel.to_string(),
            msg,
        })
    };
    if threads == 0 || threads > 1024 {
        return err(format!(
            "block {:?} has {threads} threads (1..=1024 allowed)",
            cfg.block
        ));
    }
    if bz > 64 {
        return err(format!("block z dimension {bz} exceeds 64"));
    }
    let (gx, gy, gz) = cfg.grid;
    if gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || gx > i32::MAX as u32 {
        return err(format!("grid {:?} out of range", cfg.grid));
    }
    if cfg.shared_bytes > 227 * 1024 {
        return err(format!(
            "{} bytes of dynamic shared memory exceeds 227 KiB",
            cfg.shared_bytes
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Threads racing to the first use of an ordinal all get the one device: a
    /// second handle would have its own cache and capture state (a graph capture
    /// begun on one handle would not see the work queued through the other).
    #[test]
    fn racing_first_use_registers_one_device() {
        const ORD: usize = 9_000_017; // no other test uses it
        static OPENED: AtomicUsize = AtomicUsize::new(0);
        // Any backend will do; fetched first, as the registry's lock is held while
        // the closure runs.
        let emu = crate::device::emu::gpu_device()
            .expect("the emulated device")
            .backend;
        let start = std::sync::Barrier::new(8);
        let devs: Vec<GpuDevice> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        register_backend_once(ORD, || {
                            OPENED.fetch_add(1, Ordering::SeqCst);
                            emu.clone()
                        })
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            OPENED.load(Ordering::SeqCst),
            1,
            "the backend was opened once"
        );
        for d in &devs[1..] {
            assert!(
                Arc::ptr_eq(&d.backend, &devs[0].backend),
                "one handle per ordinal"
            );
        }
    }
}
