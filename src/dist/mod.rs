//! Data-parallel training: one process (or, in tests, one thread) per device, each
//! with a full copy of the model, each reading its own shard of every epoch; gradients
//! are averaged across ranks during backward so every rank takes the same step.
//!
//! - [`Collective`]: the small interface the rest of the engine talks to (all-reduce,
//!   broadcast, all-gather, barrier). Implementations:
//!   [`local_group`] (threads of one process: the tests run the whole data-parallel
//!   path with it on the CPU and on emulated devices), [`TcpComm`] (processes over
//!   TCP, the rendezvous and a CPU fallback) and, behind the `nccl` cargo feature,
//!   `NcclComm` (NCCL through cudarc, loaded at run time).
//! - [`GradReducer`]: gradients in ~25 MB buckets in reverse parameter order, each
//!   bucket all-reduced on a communication thread as soon as its gradients are final
//!   during backward, in the same bucket order on every rank.
//! - [`BucketQueues`]: a device bucket's trip from the compute stream to the
//!   communication stream and back, ordered by events (NCCL: CUDA events and a
//!   communication stream; emulated devices: [`EmuQueues`], which logs the order).
//! - [`CommStream`]: the rank's communication thread; the gradient buckets and
//!   SyncBatchNorm's collectives queue on it so that every rank issues them in one order.
//! - [`sync_batch_norm`]: `torch.nn.SyncBatchNorm` (`norm = "sync_bn"` in
//!   `[model.backbone]`), statistics and gradient sums reduced across the ranks.
//! - [`Rendezvous`]: `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT` as torchrun and SLURM set them.
//!
//! Failure rule: no collective waits forever. A rank that does not arrive within the
//! group's timeout, or that stops (error, panic, closed connection), makes every
//! other rank's pending and later collectives return [`Error::Distributed`] naming it.
//!
//! Reduction order: the CPU implementations add the ranks' contributions in rank
//! order (0, 1, ..., W-1) in f32 and divide by W for [`ReduceOp::Avg`], so every rank
//! gets bit-identical results and a single process averaging the same shards'
//! gradients the same way gets the same bits.

mod ddp;
mod eval;
mod local;
#[cfg(feature = "nccl")]
mod nccl;
mod queues;
mod reducer;
mod rendezvous;
mod stream;
mod sync_bn;
mod tcp;

pub use ddp::{distribute_runner, DistOptions, META_KEY};
pub use eval::gather_detections;
pub use local::{local_group, LocalComm};
#[cfg(feature = "nccl")]
pub use nccl::{nccl_available, NcclComm};
pub use queues::{BucketQueues, EmuQueues, Queue, QueueEntry, QueueEvent, QueueLog, QueueStep};
pub use reducer::{BucketLaunch, GradReducer, DEFAULT_BUCKET_BYTES};
pub use rendezvous::Rendezvous;
pub use stream::{CommStream, Pending};
pub use sync_bn::{set_sync_bn_group, sync_batch_norm, sync_bn_group};
pub use tcp::TcpComm;

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How an all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the world size.
    Avg,
}

/// The default time a rank waits for the others at a collective (and at the
/// rendezvous) before it gives up with an error naming the ranks that did not come.
/// `KESTREL_DIST_TIMEOUT` (seconds) overrides it.
pub fn default_timeout() -> Duration {
    std::env::var("KESTREL_DIST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(300))
}

/// Collective communication among the `world_size` ranks of a data-parallel group.
///
/// Every rank must call the same collectives in the same order with buffers of the
/// same length; a mismatch is an error on every rank, not a hang. A call waits at
/// most the group's timeout for the others.
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Combine `buf` elementwise across ranks; every rank ends with the result.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Copy rank `root`'s `buf` into every rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Every rank's `data` (lengths may differ), in rank order.
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Return once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Tell the others this rank stops, with why: their pending and later collectives
    /// fail with an error naming this rank. Dropping the communicator without having
    /// called it does the same with a generic reason.
    fn abort(&self, reason: &str);

    /// The device queues that order this communicator's all-reduces of device
    /// gradient buckets against the compute stream with events ([`BucketQueues`]);
    /// `None` (the default) reduces device buckets with
    /// [`Collective::all_reduce_tensor`] on the communication thread.
    fn bucket_queues(&self) -> Option<Arc<dyn BucketQueues>> {
        None
    }

    /// Every rank's `data` (lengths may differ), in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(self
            .all_gather_bytes(&bytes)?
            .iter()
            .map(|b| f32s_from_le(b))
            .collect())
    }

    /// [`Collective::all_reduce`] of an f32 tensor on any device; the result lives on
    /// the tensor's device. (The CPU implementations go through host memory.)
    fn all_reduce_tensor(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut v = t.to_vec::<f32>()?;
        self.all_reduce(&mut v, op)?;
        Tensor::from_vec(v, t.shape().clone())?.to_device(t.device())
    }

    /// [`Collective::broadcast`] of an f32 tensor on any device.
    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut v = t.to_vec::<f32>()?;
        self.broadcast(&mut v, root)?;
        Tensor::from_vec(v, t.shape().clone())?.to_device(t.device())
    }
}

/// A shared handle to a communicator.
pub type Comm = Arc<dyn Collective>;

/// f32 values from little-endian bytes (a length not a multiple of 4 drops the tail;
/// callers check lengths first).
pub(crate) fn f32s_from_le(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The reduction every CPU implementation uses: contributions added in rank order in
/// f32, then divided by the world size for [`ReduceOp::Avg`].
pub(crate) fn reduce_in_rank_order(parts: &[Vec<u8>], out: &mut [f32], op: ReduceOp) {
    out.iter_mut().for_each(|x| *x = 0.0);
    for p in parts {
        for (o, c) in out.iter_mut().zip(p.chunks_exact(4)) {
            *o += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    if op == ReduceOp::Avg {
        let w = parts.len() as f32;
        out.iter_mut().for_each(|x| *x /= w);
    }
}

/// The collective implemented on top of an exchange of byte messages (every rank
/// contributes one message and receives all of them): shared by the in-process and
/// TCP communicators. `what` names the collective and its size so that ranks calling
/// different collectives are caught.
pub(crate) trait Exchange {
    fn exchange(&self, what: &str, data: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>>;
}

pub(crate) fn exchange_all_reduce(x: &dyn Exchange, buf: &mut [f32], op: ReduceOp) -> Result<()> {
    let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let parts = x.exchange(
        &format!("all_reduce({op:?}) of {} values", buf.len()),
        bytes,
    )?;
    reduce_in_rank_order(&parts, buf, op);
    Ok(())
}

pub(crate) fn exchange_broadcast(
    x: &dyn Exchange,
    buf: &mut [f32],
    root: usize,
    world: usize,
) -> Result<()> {
    if root >= world {
        return Err(Error::invalid(
            "broadcast",
            format!("root {root} in a world of {world}"),
        ));
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let parts = x.exchange(
        &format!("broadcast from {root} of {} values", buf.len()),
        bytes,
    )?;
    buf.copy_from_slice(&f32s_from_le(&parts[root]));
    Ok(())
}
