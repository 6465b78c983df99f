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

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

struct Job {
    bucket: usize,
    data: Vec<f32>,
}

/// A bucket back from the communication thread: its index and averaged values.
type Reduced = Result<(usize, Vec<f32>)>;

/// The state one backward pass shares with the tape's hook.
struct Pass {
    ids: HashMap<TensorId, usize>,
    grads: Vec<Option<Tensor>>,
    missing: Vec<usize>,
    next_launch: usize,
    jobs: Sender<Job>,
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
    jobs: Option<Sender<Job>>,
    results: Option<Receiver<Reduced>>,
    thread: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<BucketLaunch>>>,
}

impl GradReducer {
    /// A reducer over `comm` with buckets of about `bucket_bytes` (at least one
    /// parameter each). The communication thread starts here.
    pub fn new(comm: Comm, bucket_bytes: usize) -> GradReducer {
        let (jobs, job_rx) = channel::<Job>();
        let (res_tx, results) = channel();
        let c = comm;
        // The communication "stream": collectives run here, in launch order, while
        // the backward pass continues on the training thread.
        let thread = std::thread::spawn(move || {
            for mut job in job_rx {
                let r = c
                    .all_reduce(&mut job.data, ReduceOp::Avg)
                    .map(|()| (job.bucket, job.data));
                if res_tx.send(r).is_err() {
                    return;
                }
            }
        });
        GradReducer {
            bucket_bytes: bucket_bytes.max(1),
            buckets: Vec::new(),
            bucket_of: Vec::new(),
            shapes: Vec::new(),
            devices: Vec::new(),
            pass: None,
            jobs: Some(jobs),
            results: Some(results),
            thread: Some(thread),
            log: Arc::new(Mutex::new(Vec::new())),
        }
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

impl Pass {
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
            let mut data = Vec::new();
            for &p in &buckets[b] {
                match &self.grads[p] {
                    Some(g) => data.extend(g.to_vec::<f32>()?),
                    None => data.extend(std::iter::repeat_n(0.0f32, shapes[p].numel())),
                }
            }
            self.jobs
                .send(Job { bucket: b, data })
                .map_err(|_| Error::Distributed("the communication thread stopped".into()))?;
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
        let jobs = self
            .jobs
            .clone()
            .ok_or_else(|| Error::Distributed("the communication thread stopped".into()))?;
        let pass = Arc::new(Mutex::new(Pass {
            ids: params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.id(), i))
                .collect(),
            grads: vec![None; params.len()],
            missing: self.buckets.iter().map(Vec::len).collect(),
            next_launch: 0,
            jobs,
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
        drop(p);
        let results = self
            .results
            .as_ref()
            .ok_or_else(|| Error::Distributed("the communication thread stopped".into()))?;
        for expected in 0..self.buckets.len() {
            let (b, data) = results
                .recv()
                .map_err(|_| Error::Distributed("the communication thread stopped".into()))??;
            if b != expected {
                return Err(Error::Distributed(format!(
                    "bucket {b} came back where {expected} was expected"
                )));
            }
            let mut off = 0;
            for &i in &self.buckets[b] {
                let n = self.shapes[i].numel();
                let t = Tensor::from_vec(data[off..off + n].to_vec(), self.shapes[i].clone())?;
                grads[i] = Some(t.to_device(self.devices[i])?);
                off += n;
            }
        }
        Ok(())
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        // Closing the job channel ends the communication thread after its current job.
        // It is not joined: that job may wait for a rank that is gone, until the
        // group's timeout, and the training thread should not wait for it.
        self.jobs = None;
        self.results = None;
        self.thread.take();
    }
}
