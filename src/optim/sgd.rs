//! Stochastic gradient descent with momentum, as `torch.optim.SGD`.
//!
//! Per parameter `p` with gradient `g`, exactly PyTorch's update:
//!
//! ```text
//! d = g + weight_decay * p
//! if momentum != 0:
//!     buf = d                                        (first step)
//!     buf = momentum * buf + (1 - dampening) * d     (later steps)
//!     d = nesterov ? d + momentum * buf : buf
//! p = p - lr * d
//! ```
//!
//! Tensors are immutable values: a step replaces each parameter with a new tensor
//! (a new id) and keeps the new momentum buffers. On the CPU every parameter is
//! updated in one parallel pass over all of them, into buffers recycled from the
//! previous step through the host pool. On CUDA one multi-tensor kernel
//! (`sgd_multi_f32`, kernels/sgd.cu) updates every parameter of the step in one
//! launch over a pointer table (one small upload): it reads `p`, `g`, `buf` and
//! writes the new `p` and `buf` in one pass. The new tensors come from the caching
//! allocator (the blocks of the previous step's values), so a step after the
//! first allocates nothing from the driver; it is not in place, since other holders
//! of the old values (EMA, checkpoints, the caller) must keep seeing them.

use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{DType, Element, Tensor};
use crate::with_dtype;

/// Hyperparameters of [`Sgd`]: torch.optim.SGD's names and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (>= 0).
    pub lr: f64,
    /// Momentum factor (>= 0); 0 disables the momentum buffer.
    pub momentum: f64,
    /// L2 penalty added to the gradient (>= 0).
    pub weight_decay: f64,
    /// Dampening of the gradient's contribution to the momentum buffer.
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            weight_decay: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// The checks torch.optim.SGD makes, as errors.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("Sgd", msg));
        for (name, v) in [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        if !self.dampening.is_finite() {
            return bad(format!("dampening must be finite, got {}", self.dampening));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return bad(format!(
                "nesterov needs momentum > 0 and dampening 0, got momentum {} dampening {}",
                self.momentum, self.dampening
            ));
        }
        Ok(())
    }
}

/// SGD over a list of parameters, with one momentum buffer per parameter index.
#[derive(Clone, Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    /// Momentum buffer of parameter `i`; `None` before its first step.
    buffers: Vec<Option<Tensor>>,
}

/// The state name of parameter `i`'s momentum buffer.
fn buffer_name(i: usize) -> String {
    format!("momentum_buffer.{i}")
}

impl Sgd {
    /// An optimizer with `cfg`; errors when `cfg` is out of range (see
    /// [`SgdConfig::validate`]).
    pub fn new(cfg: SgdConfig) -> Result<Sgd> {
        cfg.validate()?;
        Ok(Sgd {
            cfg,
            buffers: Vec::new(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Set the learning rate (schedulers call this before a step); must be >= 0.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        SgdConfig { lr, ..self.cfg }.validate()?;
        self.cfg.lr = lr;
        Ok(())
    }

    /// One step: replaces `params[i]` by its updated value for every `i`, given
    /// `grads[i]` of the same shape, dtype and device. Parameters must come in the
    /// same order every step (buffers are keyed by index). On error nothing changes.
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor]) -> Result<()> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
        self.step_optional(params, &grads)
    }

    /// [`Sgd::step`] where a parameter without a gradient (`None`) is left as it is,
    /// its momentum buffer too (PyTorch skips parameters whose `.grad` is None).
    pub fn step_optional(
        &mut self,
        params: &mut [Tensor],
        grads: &[Option<&Tensor>],
    ) -> Result<()> {
        if grads.len() != params.len() {
            return Err(Error::invalid(
                "Sgd::step",
                format!("{} gradients for {} parameters", grads.len(), params.len()),
            ));
        }
        if self.buffers.len() > params.len() {
            return Err(Error::invalid(
                "Sgd::step",
                format!(
                    "optimizer state holds buffers for {} parameters, {} given",
                    self.buffers.len(),
                    params.len()
                ),
            ));
        }
        self.buffers.resize(params.len(), None);
        // Compute every update before replacing anything, so an error leaves the
        // parameters and buffers as they were. CUDA parameters are collected and
        // updated together, one launch per device.
        let mut updates = Vec::with_capacity(params.len());
        let mut on_gpu: Vec<GpuJob> = Vec::new();
        // CPU parameters are collected and updated together in one parallel pass.
        let mut cpu_items = Vec::new();
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let Some(g) = g else {
                updates.push(None);
                continue;
            };
            check_grad(i, p, g)?;
            let buf = match &self.buffers[i] {
                Some(b) if self.cfg.momentum != 0.0 => Some(conform(b, p, i)?),
                _ => None,
            };
            if p.device().is_cuda() {
                on_gpu.push(GpuJob {
                    i,
                    p: p.clone(),
                    g: (*g).clone(),
                    buf,
                });
                updates.push(None);
            } else {
                cpu_items.push(CpuItem {
                    index: i,
                    p: p.clone(),
                    g: (*g).clone(),
                    buf,
                });
                updates.push(None);
            }
        }
        for (i, u) in gpu_update_all(&self.cfg, on_gpu)? {
            updates[i] = Some(u);
        }
        for (i, u) in cpu_step_all(&self.cfg, &cpu_items)? {
            updates[i] = Some(u);
        }
        drop(cpu_items);
        for (i, u) in updates.into_iter().enumerate() {
            if let Some((p, buf)) = u {
                params[i] = p;
                if buf.is_some() {
                    self.buffers[i] = buf;
                }
            }
        }
        Ok(())
    }

    /// The momentum buffers as named tensors (`momentum_buffer.<param index>`), for
    /// checkpoints. Empty without momentum or before the first step.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (buffer_name(i), b.clone())))
            .collect()
    }

    /// Replace the momentum buffers by those of [`Sgd::state`]. Buffers may sit on
    /// another device or in another float type than the parameters (a checkpoint read
    /// on the CPU): the next step converts them. Unknown names are an error.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut buffers: Vec<Option<Tensor>> = Vec::new();
        for (name, t) in state {
            let i: usize = name
                .strip_prefix("momentum_buffer.")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    Error::invalid(
                        "Sgd::load_state",
                        format!("unknown state entry `{name}` (expected momentum_buffer.<index>)"),
                    )
                })?;
            if t.dtype() == DType::I64 {
                return Err(Error::DType {
                    op: "Sgd::load_state",
                    dtype: "i64".into(),
                    msg: format!("`{name}` must be a float tensor"),
                });
            }
            if buffers.len() <= i {
                buffers.resize(i + 1, None);
            }
            buffers[i] = Some(t.clone());
        }
        self.buffers = buffers;
        Ok(())
    }
}

/// `buf` on `p`'s device and dtype, with `p`'s shape (an error otherwise).
fn conform(buf: &Tensor, p: &Tensor, i: usize) -> Result<Tensor> {
    if buf.shape() != p.shape() {
        return Err(Error::shape(
            "Sgd::step",
            format!(
                "momentum buffer {} for parameter {i} of shape {}",
                buf.shape(),
                p.shape()
            ),
        ));
    }
    let b = buf.to_device(p.device())?;
    if b.dtype() != p.dtype() && p.device() == Device::Cpu {
        return b.to_dtype(p.dtype());
    }
    Ok(b)
}

/// An error unless gradient `g` of parameter `i` matches it in shape, dtype and device.
fn check_grad(i: usize, p: &Tensor, g: &Tensor) -> Result<()> {
    if g.shape() != p.shape() || g.device() != p.device() || g.dtype() != p.dtype() {
        return Err(Error::shape(
            "Sgd::step",
            format!(
                "gradient {} {} {} for parameter {i}: {} {} {}",
                g.shape(),
                g.dtype(),
                g.device(),
                p.shape(),
                p.dtype(),
                p.device()
            ),
        ));
    }
    Ok(())
}

/// One CPU parameter of a step: its index, value, gradient and momentum buffer.
struct CpuItem {
    index: usize,
    p: Tensor,
    g: Tensor,
    buf: Option<Tensor>,
}

/// Elements per task of the CPU pass: large enough to stream, small enough that the
/// largest tensors are split across threads.
const SGD_CHUNK: usize = 1 << 16;

/// A raw pointer shared by tasks that write disjoint ranges of one buffer.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: only used where each task writes a range no other task touches.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

/// Every CPU parameter's update in one parallel pass: the parameters are cut into
/// chunks of [`SGD_CHUNK`] elements and each task reads `p`, `g`, `buf` and writes
/// the new `p` and `buf` of its chunk (PyTorch's SGD element formula: weight decay, dampened momentum, Nesterov). The
/// outputs come from the host pool, where the previous step's parameters and
/// buffers went when they were replaced, so a steady-state step allocates nothing.
fn cpu_step_all(cfg: &SgdConfig, items: &[CpuItem]) -> Result<Vec<(usize, Update)>> {
    let mut out = Vec::with_capacity(items.len());
    for dtype in [DType::F32, DType::F64] {
        let of: Vec<&CpuItem> = items.iter().filter(|it| it.p.dtype() == dtype).collect();
        if of.is_empty() {
            continue;
        }
        with_dtype!(dtype, T => out.extend(cpu_pass::<T>(cfg, &of)?));
    }
    if let Some(it) = items.iter().find(|it| it.p.dtype() == DType::I64) {
        return Err(Error::DType {
            op: "Sgd::step",
            dtype: "i64".into(),
            msg: format!("parameter {} is an integer tensor", it.index),
        });
    }
    Ok(out)
}

fn cpu_pass<T: Element>(cfg: &SgdConfig, items: &[&CpuItem]) -> Result<Vec<(usize, Update)>> {
    use rayon::prelude::*;
    let (lr, m, wd) = (T::of(cfg.lr), T::of(cfg.momentum), T::of(cfg.weight_decay));
    let keep = T::of(1.0 - cfg.dampening);
    let momentum = cfg.momentum != 0.0;
    struct Views<'a, T> {
        p: &'a [T],
        g: &'a [T],
        buf: Option<&'a [T]>,
        new_p: SharedMut<T>,
        new_buf: SharedMut<T>,
    }
    let mut new_ps: Vec<Vec<T>> = Vec::with_capacity(items.len());
    let mut new_bufs: Vec<Vec<T>> = Vec::with_capacity(items.len());
    for it in items {
        let n = it.p.numel();
        new_ps.push(crate::tensor::pool::take::<T>(n));
        new_bufs.push(if momentum {
            crate::tensor::pool::take::<T>(n)
        } else {
            Vec::new()
        });
    }
    let mut views = Vec::with_capacity(items.len());
    for (k, it) in items.iter().enumerate() {
        views.push(Views {
            p: it.p.cpu_slice::<T>()?,
            g: it.g.cpu_slice::<T>()?,
            buf: it.buf.as_ref().map(|b| b.cpu_slice::<T>()).transpose()?,
            new_p: SharedMut(new_ps[k].as_mut_ptr()),
            new_buf: SharedMut(new_bufs[k].as_mut_ptr()),
        });
    }
    let chunks: Vec<(usize, usize)> = views
        .iter()
        .enumerate()
        .flat_map(|(k, v)| (0..v.p.len()).step_by(SGD_CHUNK).map(move |s| (k, s)))
        .collect();
    chunks.par_iter().for_each(|&(k, start)| {
        let v = &views[k];
        let end = v.p.len().min(start + SGD_CHUNK);
        // SAFETY: the chunk [start, end) of item k is written by this task alone, and
        // the output buffers (new_ps, new_bufs) outlive the parallel loop.
        let np = unsafe { std::slice::from_raw_parts_mut(v.new_p.0.add(start), end - start) };
        let (p, g) = (&v.p[start..end], &v.g[start..end]);
        let d = |i: usize| {
            if cfg.weight_decay != 0.0 {
                g[i] + wd * p[i]
            } else {
                g[i]
            }
        };
        if !momentum {
            for (i, o) in np.iter_mut().enumerate() {
                *o = p[i] - lr * d(i);
            }
            return;
        }
        // SAFETY: as above, for the new momentum buffer.
        let nb = unsafe { std::slice::from_raw_parts_mut(v.new_buf.0.add(start), end - start) };
        let old = v.buf.map(|b| &b[start..end]);
        for i in 0..np.len() {
            let di = d(i);
            let b = match old {
                None => di,
                Some(ob) => m * ob[i] + keep * di,
            };
            nb[i] = b;
            let step = if cfg.nesterov { di + m * b } else { b };
            np[i] = p[i] - lr * step;
        }
    });
    drop(views);
    let mut out = Vec::with_capacity(items.len());
    for ((it, np), nb) in items.iter().zip(new_ps).zip(new_bufs) {
        let shape = it.p.shape().clone();
        let buf = if momentum {
            Some(Tensor::from_vec(nb, shape.clone())?)
        } else {
            None
        };
        out.push((it.index, (Tensor::from_vec(np, shape)?, buf)));
    }
    Ok(out)
}

/// A parameter's new value and (with momentum) its new buffer.
type Update = (Tensor, Option<Tensor>);

/// One CUDA parameter of a step: its index, value, gradient and momentum buffer.
struct GpuJob {
    i: usize,
    p: Tensor,
    g: Tensor,
    buf: Option<Tensor>,
}

/// Fields per parameter in the pointer table of `sgd_multi_f32` (SGD_FIELDS in
/// kernels/sgd.cu).
const SGD_FIELDS: usize = 8;

/// The updates of every CUDA parameter, as `(index, (new p, new buffer))`: one
/// pointer table upload and one `sgd_multi_f32` launch per device, whatever the
/// number of parameters.
fn gpu_update_all(cfg: &SgdConfig, jobs: Vec<GpuJob>) -> Result<Vec<(usize, Update)>> {
    let mut devices: Vec<Device> = Vec::new();
    for j in &jobs {
        if !devices.contains(&j.p.device()) {
            devices.push(j.p.device());
        }
    }
    let mut out = Vec::with_capacity(jobs.len());
    for device in devices {
        let mine: Vec<&GpuJob> = jobs.iter().filter(|j| j.p.device() == device).collect();
        out.extend(gpu_update_device(cfg, &mine)?);
    }
    Ok(out)
}

fn gpu_update_device(cfg: &SgdConfig, jobs: &[&GpuJob]) -> Result<Vec<(usize, Update)>> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    if let Some(j) = jobs.iter().find(|j| j.p.dtype() != DType::F32) {
        return Err(Error::DType {
            op: "Sgd::step",
            dtype: j.p.dtype().to_string(),
            msg: format!("parameter {} on CUDA must be f32", j.i),
        });
    }
    let dev = gpu_dev("Sgd::step", &first.p)?;
    let with_momentum = cfg.momentum != 0.0;
    let mut out = Vec::with_capacity(jobs.len());
    let mut table: Vec<i64> = Vec::with_capacity(jobs.len() * SGD_FIELDS);
    let mut total = 0usize;
    for j in jobs {
        let n = j.p.numel();
        let new_p = Tensor::gpu_empty(&dev, j.p.shape().clone())?;
        let new_buf = if with_momentum {
            Some(Tensor::gpu_empty(&dev, j.p.shape().clone())?)
        } else {
            None
        };
        if n > 0 {
            let ptr = |t: &Tensor| -> Result<i64> { Ok(t.gpu()?.buf.ptr() as i64) };
            // Unused buffer fields (no momentum, or the first step) point at p /
            // new_p: the kernel never reads or writes them then.
            table.extend([
                ptr(&j.p)?,
                ptr(&j.g)?,
                ptr(j.buf.as_ref().unwrap_or(&j.p))?,
                ptr(&new_p)?,
                ptr(new_buf.as_ref().unwrap_or(&new_p))?,
                n as i64,
                total as i64,
                j.buf.is_none() as i64,
            ]);
            total += n;
        }
        out.push((j.i, (new_p, new_buf)));
    }
    let rows = table.len() / SGD_FIELDS;
    if rows == 0 {
        return Ok(out);
    }
    if rows > i32::MAX as usize {
        return Err(Error::invalid("Sgd::step", format!("{rows} parameters")));
    }
    // Every tensor the table points at is held by `jobs` or `out` until the launch
    // has been queued; later work on the one stream runs after it.
    let table = Tensor::from_vec_i64(table, [rows * SGD_FIELDS])?.to_device(first.p.device())?;
    launch_elems(
        &dev,
        "sgd_multi_f32",
        total,
        &[
            arg(&table)?,
            KernelArg::I32(rows as i32),
            KernelArg::I64(total as i64),
            KernelArg::F32(cfg.lr as f32),
            KernelArg::F32(cfg.momentum as f32),
            KernelArg::F32(cfg.weight_decay as f32),
            KernelArg::F32((1.0 - cfg.dampening) as f32),
            KernelArg::I32(cfg.nesterov as i32),
        ],
    )?;
    Ok(out)
}

impl crate::runner::Optimizer for Sgd {
    fn step(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Option::as_ref).collect();
        self.step_optional(params, &grads)
    }
    fn lr(&self) -> f64 {
        Sgd::lr(self)
    }
    fn set_lr(&mut self, lr: f64) {
        // The LR updater only produces finite, non-negative rates from a valid
        // config; a bad one was refused when the schedule was built.
        let _ = Sgd::set_lr(self, lr);
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        Sgd::state(self)
    }
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        Sgd::load_state(self, &state)
    }
}
