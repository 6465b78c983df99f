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
        ptr: u64,
        bytes: usize,
    },
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// Grid and block dimensions of a launch, and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
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
pub trait GpuBackend: Send + Sync {
    /// Human-readable name ("NVIDIA H100 80GB HBM3 (sm_90)", "emulated").
    fn name(&self) -> String;
    /// A zero-filled allocation of `bytes` bytes.
    fn alloc(&self, bytes: usize) -> Result<GpuBuffer>;
    /// Copy host bytes into the start of `dst`.
    fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()>;
    /// Copy the first `dst.len()` bytes of `src` to the host (waits for prior work).
    fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()>;
    /// Copy `bytes` bytes from `src` to `dst`.
    fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()>;
    /// Launch the `extern "C" __global__` entry `kernel` (see `kestrel kernels`).
    fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()>;
    /// Wait for all launched work.
    fn synchronize(&self) -> Result<()>;
}

/// A handle to an opened GPU: its ordinal and backend.
#[derive(Clone)]
pub struct GpuDevice {
    pub ordinal: usize,
    pub backend: Arc<dyn GpuBackend>,
}

impl GpuDevice {
    /// Allocate, copy and check a launch's buffers in one place for the ops.
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        self.backend.alloc(bytes)
    }
    /// Launch `kernel` (see [`GpuBackend::launch`]).
    pub fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KernelArg]) -> Result<()> {
        self.backend.launch(kernel, &cfg, args)
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
    let dev = GpuDevice { ordinal, backend };
    reg.1.insert(ordinal, dev.clone());
    dev
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
    let dev = GpuDevice {
        ordinal: n,
        backend,
    };
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
