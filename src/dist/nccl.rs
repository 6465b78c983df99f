//! NCCL through cudarc (`nccl` cargo feature; libnccl is loaded at run time, so a
//! machine without it builds and runs everything else). Rank 0 creates the NCCL
//! unique id and hands it to the others over the TCP rendezvous.
//!
//! This first version takes host buffers, as the [`Collective`] interface does: each
//! call copies to the device, runs the NCCL collective on the communicator's own
//! stream (separate from the compute stream) and copies back. Failures of the other
//! ranks are caught by the TCP rendezvous connection, which stays open for
//! `all_gather_bytes`, `barrier` and `abort`.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm as RawComm, Id};

use super::{Collective, ReduceOp, TcpComm};
use crate::error::{Error, Result};

/// Whether NCCL can be used here: the CUDA driver and libnccl can both be loaded.
/// Checked before any NCCL call (cudarc panics when a library is missing).
pub fn nccl_available() -> bool {
    // SAFETY: these only try to open the shared libraries; no library call is made.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// One rank of an NCCL communicator on GPU `ordinal` (see the module docs).
pub struct NcclComm {
    comm: Mutex<RawComm>,
    stream: Arc<CudaStream>,
    tcp: TcpComm,
}

// SAFETY: the raw NCCL communicator is only used under the mutex, one call at a time,
// which is what NCCL requires of a communicator shared between threads.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

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
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        let all = tcp.all_gather_bytes(&id_bytes)?;
        let raw: [::core::ffi::c_char; 128] = all[0]
            .iter()
            .map(|&b| b as ::core::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Distributed("rank 0 sent an NCCL id of the wrong size".into()))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("NCCL context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("NCCL stream", e))?;
        let comm = RawComm::from_rank(
            stream.clone(),
            tcp.rank(),
            tcp.world_size(),
            Id::uninit(raw),
        )
        .map_err(|e| nccl_err("comm_init_rank", e))?;
        Ok(NcclComm {
            comm: Mutex::new(comm),
            stream,
            tcp,
        })
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
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let mut d = self
            .stream
            .clone_htod(buf)
            .map_err(|e| Error::cuda("NCCL all_reduce upload", e))?;
        let op = match op {
            ReduceOp::Sum => cudarc::nccl::safe::ReduceOp::Sum,
            ReduceOp::Avg => cudarc::nccl::safe::ReduceOp::Avg,
        };
        comm.all_reduce_in_place(&mut d, &op)
            .map_err(|e| nccl_err("all_reduce", e))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| Error::cuda("NCCL all_reduce download", e))?;
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("NCCL all_reduce", e))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let mut d = self
            .stream
            .clone_htod(buf)
            .map_err(|e| Error::cuda("NCCL broadcast upload", e))?;
        comm.broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| Error::cuda("NCCL broadcast download", e))?;
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("NCCL broadcast", e))
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
