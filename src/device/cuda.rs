//! The CUDA driver implementation of [`GpuBackend`], on cudarc. One context and one
//! stream per device; modules loaded lazily per kernel file and cached.
//!
//! The stream is a created (non-blocking) stream, not the legacy default stream:
//! stream capture (CUDA graphs) is not allowed on the legacy stream. Every copy and
//! memset is therefore queued on that stream explicitly (a plain `cuMemcpyHtoD`
//! runs on the legacy stream and would not be ordered with our kernels).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as drv, sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream,
    DevicePtr, HostSlice, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::gpu::{validate_launch, GpuBackend, GpuBuffer, GraphExec, KernelArg, LaunchCfg};
use super::kernels;
use crate::error::{Error, Result};

/// A CUDA device driven through the driver API.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Page-locked staging buffer of [`GpuBackend::copy_htod_pinned`] (grown on demand).
    staging: Mutex<Option<PinnedHostSlice<u8>>>,
}

/// Whether the CUDA driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether libcuda can be opened; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaBackend {
    /// Open device `ordinal`. Errors (no panic) without a driver or device.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        if !driver_present() {
            return Err(Error::CudaUnavailable(
                "no CUDA driver library (libcuda.so) on this machine".into(),
            ));
        }
        drv::init().map_err(|e| Error::CudaUnavailable(format!("cuInit failed: {e}")))?;
        let count =
            CudaContext::device_count().map_err(|e| Error::CudaUnavailable(format!("{e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal} requested but {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cuda:{ordinal}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda(format!("cuda:{ordinal}: creating a stream"), e))?;
        Ok(Arc::new(CudaBackend {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(None),
        }))
    }

    fn function(&self, kernel: &str) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kernel)
        {
            return Ok(f.clone());
        }
        let file = kernels::file_of(kernel)?;
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match mods.get(file.file) {
                Some(m) => m.clone(),
                None => {
                    let ptx = kernels::ptx_for(file, kernel)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(|e| Error::cuda(format!("loading module {}", file.file), e))?;
                    mods.insert(file.file, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(kernel)
            .map_err(|e| Error::cuda(format!("loading function {kernel}"), e))?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kernel.to_string(), f.clone());
        Ok(f)
    }
}

impl GpuBackend for CudaBackend {
    fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "CUDA device".into());
        match self.ctx.compute_capability() {
            Ok((a, b)) => format!("{name} (sm_{a}{b})"),
            Err(_) => name,
        }
    }

    fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        // Zero-sized tensors still get a distinct, valid address. Not zero-filled:
        // ops that need zeros ask for a memset (GpuDevice::alloc_zeroed).
        // SAFETY: u8 has no invalid bit patterns; nothing reads the block before a
        // kernel, copy or memset writes it.
        let slice: CudaSlice<u8> = unsafe { self.stream.alloc(bytes.max(1)) }
            .map_err(|e| Error::cuda(format!("alloc {bytes} bytes"), e))?;
        let ptr = {
            let (p, _sync) = slice.device_ptr(&self.stream);
            p
        };
        Ok(GpuBuffer::new(ptr, bytes, Arc::new(SendSlice(slice))))
    }

    fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        if src.len() > dst.bytes() {
            return Err(Error::invalid(
                "copy_htod",
                format!("{} bytes into a {}-byte buffer", src.len(), dst.bytes()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("bind context", e))?;
        // SAFETY: dst is a live allocation of at least src.len() bytes. From pageable
        // memory the driver stages `src` before returning, so the caller may reuse it
        // at once; the copy is ordered on our stream with the kernels around it.
        unsafe { drv::memcpy_htod_async(dst.ptr(), src, self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memcpy htod", e))
    }

    fn copy_htod_pinned(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        if src.len() > dst.bytes() {
            return Err(Error::invalid(
                "copy_htod_pinned",
                format!("{} bytes into a {}-byte buffer", src.len(), dst.bytes()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if staging.as_ref().is_none_or(|p| p.len() < src.len()) {
            // Dropping the old buffer waits for the copy that last read it.
            *staging = None;
            // SAFETY: the contents are written below before any copy reads them.
            let p = unsafe { self.ctx.alloc_pinned::<u8>(src.len().next_power_of_two()) }
                .map_err(|e| Error::cuda(format!("pinned host alloc of {} bytes", src.len()), e))?;
            *staging = Some(p);
        }
        let Some(pinned) = staging.as_mut() else {
            unreachable!("the staging buffer was allocated above")
        };
        // Waits (on the buffer's event only, not the stream) for the previous copy
        // out of the staging buffer, then fills it.
        pinned
            .as_mut_slice()
            .map_err(|e| Error::cuda("waiting for the staging buffer", e))?[..src.len()]
            .copy_from_slice(src);
        // SAFETY: the slice is pinned host memory that outlives the copy: the guard
        // records the buffer's event after the copy is queued, and the next use (or
        // the drop) of the buffer waits for that event.
        let (host, _record) = unsafe { pinned.stream_synced_slice(&self.stream) };
        // SAFETY: dst is live and holds at least src.len() bytes (checked above).
        unsafe { drv::memcpy_htod_async(dst.ptr(), &host[..src.len()], self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memcpy htod (pinned)", e))
    }

    fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.bytes() {
            return Err(Error::invalid(
                "copy_dtoh",
                format!("{} bytes from a {}-byte buffer", dst.len(), src.bytes()),
            ));
        }
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronize before dtoh", e))?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: src is live and at least dst.len() bytes; the stream is idle.
        unsafe { drv::memcpy_dtoh_sync(dst, src.ptr()) }.map_err(|e| Error::cuda("memcpy dtoh", e))
    }

    fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()> {
        if bytes > src.bytes() || bytes > dst.bytes() {
            return Err(Error::invalid(
                "copy_dtod",
                format!(
                    "{bytes} bytes between buffers of {} and {}",
                    src.bytes(),
                    dst.bytes()
                ),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both allocations are live and hold at least `bytes` bytes.
        unsafe { drv::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memcpy dtod", e))
    }

    fn memset(&self, dst: &GpuBuffer, value: u8) -> Result<()> {
        if dst.bytes() == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("bind context", e))?;
        // SAFETY: dst is a live allocation of dst.bytes() bytes; the memset is
        // ordered on the one stream like every kernel that uses the buffer.
        unsafe { drv::memset_d8_async(dst.ptr(), value, dst.bytes(), self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memset", e))
    }

    fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()> {
        validate_launch(kernel, cfg)?;
        let f = self.function(kernel)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KernelArg::Ptr { ptr, .. } => b.arg(ptr),
                KernelArg::I32(v) => b.arg(v),
                KernelArg::U32(v) => b.arg(v),
                KernelArg::I64(v) => b.arg(v),
                KernelArg::F32(v) => b.arg(v),
                KernelArg::F64(v) => b.arg(v),
            };
        }
        let lc = LaunchConfig {
            grid_dim: cfg.grid,
            block_dim: cfg.block,
            shared_mem_bytes: cfg.shared_bytes,
        };
        // SAFETY: argument count and types follow the kernel's signature (each op's
        // launcher is written beside its kernel and tested for parity); every pointer
        // is a live allocation held by the caller until the stream synchronises.
        unsafe { b.launch(lc) }.map_err(|e| Error::Launch {
            kernel: kernel.to_string(),
            msg: e.to_string(),
        })?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronize", e))
    }

    fn cuda_stream(&self) -> Option<usize> {
        Some(self.stream.cu_stream() as usize)
    }

    fn begin_capture(&self) -> Result<()> {
        // Thread-local mode: an unsafe call (a sync, a legacy-stream copy) from
        // this thread during the capture fails instead of silently joining it.
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::cuda("begin stream capture", e))
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| Error::cuda("end stream capture", e))?
            .ok_or_else(|| Error::cuda("end stream capture", "nothing was captured"))?;
        let nodes = graph_nodes(&graph);
        Ok(Box::new(CudaGraphExec {
            graph: Mutex::new(graph),
            nodes,
        }))
    }
}

/// Number of nodes in a captured graph (0 if the driver cannot say).
fn graph_nodes(g: &CudaGraph) -> usize {
    let mut n: usize = 0;
    // SAFETY: a null node array asks only for the count; the graph is live.
    let rc = unsafe { sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) };
    if rc == sys::CUresult::CUDA_SUCCESS {
        n
    } else {
        0
    }
}

/// An instantiated CUDA graph. cudarc's `CudaGraph` is not thread-safe (graph
/// objects must not be used from two threads at once): the mutex serialises replays.
struct CudaGraphExec {
    graph: Mutex<CudaGraph>,
    nodes: usize,
}

// SAFETY: every use of the graph goes through the mutex, which is what the driver
// requires of graph objects shared between threads.
unsafe impl Send for CudaGraphExec {}
unsafe impl Sync for CudaGraphExec {}

impl GraphExec for CudaGraphExec {
    fn replay(&self) -> Result<()> {
        self.graph
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .launch()
            .map_err(|e| Error::cuda("graph launch", e))
    }
    fn nodes(&self) -> usize {
        self.nodes
    }
}

/// CudaSlice holds raw CUDA handles; it is freed on the stream it was made on.
struct SendSlice(#[allow(dead_code)] CudaSlice<u8>);
// SAFETY: the slice is only dropped (cuMemFreeAsync on its stream), never accessed
// through this wrapper; cudarc's own CudaSlice is Send + Sync for the same reason.
unsafe impl Send for SendSlice {}
unsafe impl Sync for SendSlice {}
