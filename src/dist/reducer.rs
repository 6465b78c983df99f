//! Bucketed gradient averaging overlapped with backward (PyTorch DDP's Reducer).
//!
//! Parameters are grouped into buckets of about [`DEFAULT_BUCKET_BYTES`] in reverse
//! [`crate::runner::Model::params`] order: backward produces the last layers'
//! gradients first, so the first bucket is complete early. During backward the tape
//! reports each parameter's gradient as soon as it is final; when a bucket is complete
//! and every bucket before it has been launched, its gradients are flattened into one
//! buffer and handed to the communication thread, which all-reduces (averages) the
//! buckets one after another while backward goes on. Launching strictly in bucket
//! order keeps the sequence of collectives identical on every rank even when ranks
//! complete buckets in different orders. [`GradReducer::finish`] launches what is
//! left (a parameter with no gradient on this rank counts as zeros, as DDP with
//! `find_unused_parameters`), waits, and writes the averages back.
//!
//! Where the buckets live: for parameters on a CUDA (or emulated) device a bucket is
//! one device buffer (the gradients concatenated on the device). When the
//! communicator has [`super::BucketQueues`] (NCCL, the in-process group) the bucket
//! goes through them: a ready event on the compute stream after the concatenation,
//! the all-reduce on the communication stream after that event, and in
//! [`GradReducer::finish`] the compute stream waits for each bucket's done event
//! before the averages are sliced back on the device, so the optimizer, queued
//! after, reads reduced values and nothing is copied to the host. (With NCCL the
//! training thread waits only until the communication thread has *queued* each
//! all-reduce; the GPU orders the rest.) Communicators without queues (`TcpComm`)
//! reduce through [`super::Collective::all_reduce_tensor`], via the host. CPU
//! parameters use host buckets.
//!
//! Gradient accumulation: the runner reduces only in the backward of a step's last
//! micro-batch (DDP's `no_sync`); [`GradSync::attach_accumulated`] hands the reducer
//! the unreduced sums of the earlier micro-batches, which are added to each bucket as
//! it is flattened, so the buckets still go out during that last backward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::queues::{BucketQueues, QueueEvent};
use super::stream::{CommStream, Pending};
use super::{Comm, ReduceOp};
use crate::autograd::{GradReady, Tape};
use crate::error::{Error, Result};
use crate::runner::GradSync;
use crate::tensor::{Shape, Tensor, TensorId};
use crate::Device;

/// PyTorch DDP's default bucket capacity: 25 MiB of f32 gradients.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// One bucket handed to the communication thread, as recorded for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketLaunch {
    /// Bucket index (0 holds the last parameters).
    pub bucket: usize,
    /// Parameter indices (in `Model::params` order) of the bucket.
    pub params: Vec<usize>,
    /// Backward closures run when it was launched, of `ops_total`; `None` for a
    /// bucket launched by [`GradReducer::finish`] after the pass.
    pub ops_done: Option<usize>,
    /// Backward closures of the whole pass.
    pub ops_total: usize,
}

/// The state one backward pass shares with the tape's hook.
struct Pass {
    ids: HashMap<TensorId, usize>,
    grads: Vec<Option<Tensor>>,
    /// Gradients accumulated by earlier micro-steps that were not reduced (DDP's
    /// `no_sync`), added to this pass's before reduction.
    prior: Vec<Option<Tensor>>,
    missing: Vec<usize>,
    next_launch: usize,
    /// Launched buckets' averaged values, in bucket order.
    pending: Vec<Pending<Bucket>>,
    /// Each parameter's device.
    devices: Vec<Device>,
    stream: Arc<CommStream>,
    /// The communicator's device queues (device buckets go through them).
    queues: Option<Arc<dyn BucketQueues>>,
    log: Arc<Mutex<Vec<BucketLaunch>>>,
    ops_total: usize,
}

/// Averages gradients across the ranks of `comm` in buckets, overlapped with backward
/// (see the module docs). Install with `Runner::set_grad_sync`.
pub struct GradReducer {
    bucket_bytes: usize,
    buckets: Vec<Vec<usize>>,
    bucket_of: Vec<usize>,
    shapes: Vec<Shape>,
    devices: Vec<Device>,
    pass: Option<Arc<Mutex<Pass>>>,
    stream: Arc<CommStream>,
    log: Arc<Mutex<Vec<BucketLaunch>>>,
}

impl GradReducer {
    /// A reducer over `comm` with buckets of about `bucket_bytes` (at least one
    /// parameter each). The communication thread starts here.
    pub fn new(comm: Comm, bucket_bytes: usize) -> GradReducer {
        Self::on_stream(CommStream::new(comm), bucket_bytes)
    }

    /// A reducer whose collectives run on `stream`, shared with the other users of the
    /// communicator during backward (SyncBatchNorm), so that all of them keep one order.
    pub fn on_stream(stream: Arc<CommStream>, bucket_bytes: usize) -> GradReducer {
        GradReducer {
            bucket_bytes: bucket_bytes.max(1),
            buckets: Vec::new(),
            bucket_of: Vec::new(),
            shapes: Vec::new(),
            devices: Vec::new(),
            pass: None,
            stream,
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The communication stream the buckets are reduced on.
    pub fn stream(&self) -> Arc<CommStream> {
        self.stream.clone()
    }

    /// The buckets: parameter indices of each, in launch order.
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// A handle on the record of bucket launches (appended to by every pass; clear it
    /// to start afresh).
    pub fn launch_log(&self) -> Arc<Mutex<Vec<BucketLaunch>>> {
        self.log.clone()
    }

    fn plan(&mut self, params: &[Tensor]) {
        self.buckets.clear();
        self.bucket_of = vec![0; params.len()];
        let mut cur: Vec<usize> = Vec::new();
        let mut bytes = 0;
        for i in (0..params.len()).rev() {
            cur.push(i);
            bytes += params[i].numel() * 4;
            if bytes >= self.bucket_bytes {
                self.buckets.push(std::mem::take(&mut cur));
                bytes = 0;
            }
        }
        if !cur.is_empty() {
            self.buckets.push(cur);
        }
        for (b, ps) in self.buckets.iter().enumerate() {
            for &p in ps {
                self.bucket_of[p] = b;
            }
        }
        self.shapes = params.iter().map(|p| p.shape().clone()).collect();
        self.devices = params.iter().map(|p| p.device()).collect();
    }
}

/// A bucket's flat values: on the host (CPU parameters) or in one device buffer,
/// the latter with the done event of its all-reduce when it went through the queues.
enum Bucket {
    Host(Vec<f32>),
    Device(Tensor),
    Queued(Tensor, QueueEvent),
}

impl Pass {
    /// The bucket's gradients (prior + this pass, zeros where a parameter has none)
    /// flattened into one buffer on their device: a concatenation on the device for
    /// CUDA and emulated devices (no host staging), a host vector for the CPU.
    fn flatten(&self, params: &[usize], shapes: &[Shape]) -> Result<Bucket> {
        let devices = &self.devices;
        if devices[params[0]] == Device::Cpu {
            let mut data = Vec::new();
            for &p in params {
                let start = data.len();
                match &self.grads[p] {
                    Some(g) => data.extend(g.to_vec::<f32>()?),
                    None => data.extend(std::iter::repeat_n(0.0f32, shapes[p].numel())),
                }
                if let Some(prior) = &self.prior[p] {
                    // prior + this pass (f32 addition commutes: Runner::backward's sum).
                    for (d, a) in data[start..].iter_mut().zip(prior.to_vec::<f32>()?) {
                        *d += a;
                    }
                }
            }
            return Ok(Bucket::Host(data));
        }
        let mut flat = Vec::with_capacity(params.len());
        for &p in params {
            let n = shapes[p].numel();
            let g = match &self.grads[p] {
                Some(g) => g.reshape_detached([n])?,
                // A parameter without a gradient on this rank (rare): zeros, uploaded.
                None => Tensor::zeros([n], crate::DType::F32, devices[p])?,
            };
            flat.push(match &self.prior[p] {
                Some(a) => crate::ops::add(&a.reshape_detached([n])?, &g)?,
                None => g,
            });
        }
        let refs: Vec<&Tensor> = flat.iter().collect();
        Ok(Bucket::Device(crate::ops::concat(&refs, 0)?))
    }

    /// Launch every complete bucket whose predecessors are all launched.
    fn launch_ready(
        &mut self,
        buckets: &[Vec<usize>],
        shapes: &[Shape],
        ops_done: Option<usize>,
        all: bool,
    ) -> Result<()> {
        while self.next_launch < buckets.len() && (all || self.missing[self.next_launch] == 0) {
            let b = self.next_launch;
            let bucket = self.flatten(&buckets[b], shapes)?;
            let pending = match (bucket, self.queues.clone()) {
                (Bucket::Device(t), Some(q)) => {
                    // Ready event on the compute stream now, behind the concatenation;
                    // the communication stream waits for it before reducing.
                    let ready = q.record_ready(b, &t)?;
                    self.stream.submit(move |c| {
                        let (t, done) = q.reduce_after(c, b, ready, t)?;
                        Ok(Bucket::Queued(t, done))
                    })?
                }
                (bucket, _) => self.stream.submit(move |c| match bucket {
                    Bucket::Host(mut data) => {
                        c.all_reduce(&mut data, ReduceOp::Avg)?;
                        Ok(Bucket::Host(data))
                    }
                    Bucket::Device(t) | Bucket::Queued(t, _) => {
                        Ok(Bucket::Device(c.all_reduce_tensor(&t, ReduceOp::Avg)?))
                    }
                })?,
            };
            self.pending.push(pending);
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(BucketLaunch {
                    bucket: b,
                    params: buckets[b].clone(),
                    ops_done,
                    ops_total: self.ops_total,
                });
            self.next_launch += 1;
        }
        Ok(())
    }
}

impl GradSync for GradReducer {
    fn attach(&mut self, tape: &Tape, params: &[Tensor]) -> Result<()> {
        if self.shapes.len() != params.len()
            || self.shapes.iter().zip(params).any(|(s, p)| s != p.shape())
        {
            self.plan(params);
        }
        let pass = Arc::new(Mutex::new(Pass {
            ids: params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.id(), i))
                .collect(),
            grads: vec![None; params.len()],
            prior: vec![None; params.len()],
            missing: self.buckets.iter().map(Vec::len).collect(),
            next_launch: 0,
            pending: Vec::new(),
            devices: self.devices.clone(),
            stream: self.stream.clone(),
            queues: self.stream.comm().bucket_queues(),
            log: self.log.clone(),
            ops_total: 0,
        }));
        self.pass = Some(pass.clone());
        let buckets = self.buckets.clone();
        let bucket_of = self.bucket_of.clone();
        let shapes = self.shapes.clone();
        tape.on_grad_ready(Box::new(move |r: GradReady<'_>| {
            let mut p = pass.lock().unwrap_or_else(|e| e.into_inner());
            p.ops_total = r.ops_total;
            let Some(&i) = p.ids.get(&r.id) else {
                return Ok(());
            };
            if p.grads[i].is_none() {
                p.grads[i] = Some(r.grad.clone());
                p.missing[bucket_of[i]] -= 1;
            }
            p.launch_ready(&buckets, &shapes, Some(r.ops_done), false)
        }));
        Ok(())
    }

    fn finish(&mut self, grads: &mut [Option<Tensor>]) -> Result<()> {
        let pass = self
            .pass
            .take()
            .ok_or_else(|| Error::Distributed("GradReducer::finish without attach".into()))?;
        let mut p = pass.lock().unwrap_or_else(|e| e.into_inner());
        if grads.len() != p.grads.len() {
            return Err(Error::invalid(
                "GradReducer",
                format!("{} gradients for {} parameters", grads.len(), p.grads.len()),
            ));
        }
        // Gradients the hook did not see (a parameter used by no recorded op has none).
        for (slot, g) in p.grads.iter_mut().zip(grads.iter()) {
            if slot.is_none() {
                slot.clone_from(g);
            }
        }
        p.launch_ready(&self.buckets, &self.shapes, None, true)?;
        let pending = std::mem::take(&mut p.pending);
        let p_queues = p.queues.clone();
        drop(p);
        for (b, pending) in pending.into_iter().enumerate() {
            let bucket = match pending.wait()? {
                Bucket::Queued(t, done) => {
                    // The slicing below and the optimizer after it are queued behind
                    // the all-reduce's done event.
                    let q = p_queues.as_ref().ok_or_else(|| {
                        Error::Distributed("a queued bucket without queues".into())
                    })?;
                    q.compute_wait(b, done)?;
                    Bucket::Device(t)
                }
                other => other,
            };
            let mut off = 0;
            for &i in &self.buckets[b] {
                let (n, shape) = (self.shapes[i].numel(), self.shapes[i].clone());
                grads[i] = Some(match &bucket {
                    Bucket::Host(data) => Tensor::from_vec(data[off..off + n].to_vec(), shape)?
                        .to_device(self.devices[i])?,
                    Bucket::Device(t) | Bucket::Queued(t, _) => {
                        crate::ops::narrow(t, 0, off, n)?.reshape_detached(shape)?
                    }
                });
                off += n;
            }
        }
        Ok(())
    }

    fn attach_accumulated(&mut self, accumulated: &[Option<Tensor>]) -> Result<()> {
        let pass = self.pass.as_ref().ok_or_else(|| {
            Error::Distributed("GradReducer: accumulated gradients without attach".into())
        })?;
        let mut p = pass.lock().unwrap_or_else(|e| e.into_inner());
        if accumulated.len() != p.prior.len() {
            return Err(Error::invalid(
                "GradReducer",
                format!(
                    "{} accumulated gradients for {} parameters",
                    accumulated.len(),
                    p.prior.len()
                ),
            ));
        }
        p.prior = accumulated.to_vec();
        Ok(())
    }
}
