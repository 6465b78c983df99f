//! NCCL through cudarc (`nccl` cargo feature; libnccl is loaded at run time, so a
//! machine without it builds and runs everything else). Rank 0 creates the NCCL
//! unique id and hands it to the others over the TCP rendezvous.
//!
//! Collectives on device memory — [`Collective::all_reduce_tensor`] and the gradient
//! buckets through [`NcclQueues`], this communicator's [`BucketQueues`] — run on
//! device buffers on the communicator's own stream, ordered against the compute
//! stream of the tensor's device by CUDA events: the compute stream records *ready*,
//! the communication stream waits for it, all-reduces (`ncclAvg` for averages) and
//! records *done*, and the compute stream waits for *done* before anything queued
//! after. Nothing goes through host memory and the host does not wait for the GPU.
//! The host-slice collectives of the interface ([`Collective::all_reduce`],
//! [`Collective::broadcast`]) copy to and from the device, as their signature asks.
//! Failures of the other ranks are caught by the TCP rendezvous connection, which
//! stays open for `all_gather_bytes`, `barrier` and `abort`.
//!
//! The communicator is driven through cudarc's raw NCCL calls: its safe `Comm` takes
//! only cudarc's own slices, while our device buffers are raw allocations.

use std::sync::{Arc, Mutex};

use cudarc::driver::{result as drv, sys as dsys, CudaContext, CudaEvent, CudaStream, DevicePtr};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys as nsys;

use super::queues::{BucketQueues, QueueEvent};
use super::{Collective, ReduceOp, TcpComm};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Whether NCCL can be used here: the CUDA driver and libnccl can both be loaded.
/// Checked before any NCCL call (cudarc panics when a library is missing).
pub fn nccl_available() -> bool {
    // SAFETY: these only try to open the shared libraries; no library call is made.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// A raw NCCL communicator, destroyed on drop.
struct RawComm(nsys::ncclComm_t);

// SAFETY: the handle is only used under a mutex, one call at a time, which is what
// NCCL requires of a communicator shared between threads.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from comm_init_rank and is dropped once. Abort, not
        // destroy: destroy waits for pending work, which may wait on a dead peer.
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

/// One rank of an NCCL communicator on GPU `ordinal` (see the module docs).
pub struct NcclComm {
    queues: Arc<NcclQueues>,
    tcp: TcpComm,
}

fn nccl_err(ctx: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("NCCL {ctx}: {e:?}"))
}

impl NcclComm {
    /// Create the communicator of `tcp`'s world on GPU `ordinal`: rank 0 makes the
    /// unique id and broadcasts it over `tcp`, every rank then joins.
    pub fn new(tcp: TcpComm, ordinal: usize) -> Result<NcclComm> {
        if !nccl_available() {
            return Err(Error::CudaUnavailable(
                "NCCL needs the CUDA driver and libnccl (libnccl.so.2), not found here".into(),
            ));
        }
        let id_bytes = if tcp.rank() == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_err("unique id", e))?;
            id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        let all = tcp.all_gather_bytes(&id_bytes)?;
        let internal: [::core::ffi::c_char; 128] = all[0]
            .iter()
            .map(|&b| b as ::core::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Distributed("rank 0 sent an NCCL id of the wrong size".into()))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("NCCL context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("NCCL stream", e))?;
        ctx.bind_to_thread()
            .map_err(|e| Error::cuda("NCCL context", e))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; world size and rank are those
        // of the rendezvous.
        let comm = unsafe {
            nccl::comm_init_rank(
                comm.as_mut_ptr(),
                tcp.world_size() as i32,
                nsys::ncclUniqueId { internal },
                tcp.rank() as i32,
            )
            .map_err(|e| nccl_err("comm_init_rank", e))?;
            comm.assume_init()
        };
        Ok(NcclComm {
            queues: Arc::new(NcclQueues {
                comm: Mutex::new(RawComm(comm)),
                ctx,
                stream,
                compute: Mutex::new(None),
            }),
            tcp,
        })
    }

    /// A host collective: upload, run `f(device pointer)` on the communication
    /// stream, download, wait.
    fn via_device(
        &self,
        buf: &mut [f32],
        what: &str,
        f: impl FnOnce(u64, &NcclQueues, nsys::ncclComm_t) -> Result<()>,
    ) -> Result<()> {
        let q = &self.queues;
        let d = q
            .stream
            .clone_htod(buf)
            .map_err(|e| Error::cuda(format!("NCCL {what} upload"), e))?;
        {
            let (ptr, _sync) = d.device_ptr(&q.stream);
            q.with_comm(|c| f(ptr, q, c))?;
        }
        q.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| Error::cuda(format!("NCCL {what} download"), e))?;
        q.stream
            .synchronize()
            .map_err(|e| Error::cuda(format!("NCCL {what}"), e))
    }
}

fn nccl_op(op: ReduceOp) -> nsys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nsys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => nsys::ncclRedOp_t::ncclAvg,
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }
    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        self.via_device(buf, "all_reduce", |p, q, c| {
            // SAFETY: p is a live device allocation of n f32 values on q's stream.
            unsafe {
                nccl::all_reduce(
                    p as *const _,
                    p as *mut _,
                    n,
                    nsys::ncclDataType_t::ncclFloat32,
                    nccl_op(op),
                    c,
                    q.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
        })
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::invalid(
                "broadcast",
                format!("root {root} in a world of {}", self.world_size()),
            ));
        }
        let n = buf.len();
        self.via_device(buf, "broadcast", |p, q, c| {
            // SAFETY: as in all_reduce.
            unsafe {
                nccl::broadcast(
                    p as *const _,
                    p as *mut _,
                    n,
                    nsys::ncclDataType_t::ncclFloat32,
                    root as i32,
                    c,
                    q.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("broadcast", e))
        })
    }
    fn all_reduce_tensor(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if t.device() == crate::Device::Cpu {
            let mut v = t.to_vec::<f32>()?;
            self.all_reduce(&mut v, op)?;
            return Tensor::from_vec(v, t.shape().clone());
        }
        // Out of place into a fresh device buffer, ordered by events like a bucket.
        let q = &self.queues;
        let out = Tensor::gpu_empty(&t.gpu()?.dev, t.shape().clone())?;
        let ready = q.record_ready(0, t)?;
        let done = q.reduce_into(&ready, t, &out, op)?;
        q.compute_wait(0, done)?;
        Ok(out)
    }
    fn bucket_queues(&self) -> Option<Arc<dyn BucketQueues>> {
        Some(self.queues.clone())
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        // Variable-length messages (detections, random states): the TCP link.
        self.tcp.all_gather_bytes(data)
    }
    fn barrier(&self) -> Result<()> {
        self.tcp.barrier()
    }
    fn abort(&self, reason: &str) {
        self.tcp.abort(reason)
    }
}

/// The [`BucketQueues`] of an [`NcclComm`]: CUDA events between the compute stream of
/// the bucket's device and the communicator's stream, `ncclAllReduce` on the device
/// buffer in between (see the module docs).
pub struct NcclQueues {
    comm: Mutex<RawComm>,
    ctx: Arc<CudaContext>,
    /// The communication stream.
    stream: Arc<CudaStream>,
    /// The compute stream of the buckets' device (raw `CUstream`), learnt from the
    /// first ready event: one rank trains on one device.
    compute: Mutex<Option<usize>>,
}

fn event_of(e: &QueueEvent) -> Result<&CudaEvent> {
    e.get::<CudaEvent>()
        .ok_or_else(|| Error::Distributed("an event from another kind of queue".into()))
}

impl NcclQueues {
    fn with_comm<R>(&self, f: impl FnOnce(nsys::ncclComm_t) -> Result<R>) -> Result<R> {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("NCCL context", e))?;
        f(guard.0)
    }

    /// Queue on the communication stream: wait for `ready`, reduce `src` into `dst`
    /// (the same buffer for in place), record and return the done event.
    fn reduce_into(
        &self,
        ready: &QueueEvent,
        src: &Tensor,
        dst: &Tensor,
        op: ReduceOp,
    ) -> Result<QueueEvent> {
        if src.dtype() != crate::DType::F32 || dst.numel() != src.numel() {
            return Err(Error::invalid(
                "NCCL all_reduce",
                format!("{} {} into {}", src.dtype(), src.shape(), dst.shape()),
            ));
        }
        self.stream
            .wait(event_of(ready)?)
            .map_err(|e| Error::cuda("NCCL: communication stream waits for ready", e))?;
        let (s, d) = (src.gpu()?.buf.ptr(), dst.gpu()?.buf.ptr());
        self.with_comm(|comm| {
            // SAFETY: src and dst are live device allocations of numel f32 values,
            // kept alive by the caller until the compute stream has waited for the
            // done event (later users of the memory are queued after that wait).
            unsafe {
                nccl::all_reduce(
                    s as *const _,
                    d as *mut _,
                    src.numel(),
                    nsys::ncclDataType_t::ncclFloat32,
                    nccl_op(op),
                    comm,
                    self.stream.cu_stream() as _,
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all_reduce", e))
        })?;
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| Error::cuda("NCCL: recording done", e))?;
        Ok(QueueEvent::new(done))
    }
}

impl BucketQueues for NcclQueues {
    fn record_ready(&self, _bucket: usize, buf: &Tensor) -> Result<QueueEvent> {
        let g = buf.gpu()?;
        let compute = g.dev.backend.cuda_stream().ok_or_else(|| {
            Error::Distributed(format!(
                "NCCL needs a CUDA device: cuda:{} has no CUDA stream (an emulated device?)",
                g.dev.ordinal
            ))
        })?;
        *self.compute.lock().unwrap_or_else(|p| p.into_inner()) = Some(compute);
        let ev = self
            .ctx
            .new_event(None)
            .map_err(|e| Error::cuda("NCCL: ready event", e))?;
        // SAFETY: the event is live and the compute stream lives as long as the
        // device's backend, which the tensor holds.
        unsafe { drv::event::record(ev.cu_event(), compute as dsys::CUstream) }
            .map_err(|e| Error::cuda("NCCL: recording ready", e))?;
        Ok(QueueEvent::new(ev))
    }

    fn reduce_after(
        &self,
        _comm: &dyn Collective,
        _bucket: usize,
        ready: QueueEvent,
        buf: Tensor,
    ) -> Result<(Tensor, QueueEvent)> {
        let done = self.reduce_into(&ready, &buf, &buf, ReduceOp::Avg)?;
        Ok((buf, done))
    }

    fn compute_wait(&self, _bucket: usize, done: QueueEvent) -> Result<()> {
        let ev = event_of(&done)?;
        let compute = self
            .compute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| Error::Distributed("NCCL: compute_wait before a ready event".into()))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("NCCL context", e))?;
        // SAFETY: the compute stream and the event are live.
        unsafe {
            drv::stream::wait_event(
                compute as dsys::CUstream,
                ev.cu_event(),
                dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| Error::cuda("NCCL: compute stream waits for done", e))
    }
}
