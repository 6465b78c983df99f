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
//! The step is in place: each parameter's and momentum buffer's own storage is
//! overwritten, so their buffers (and device addresses) stay the same from step to
//! step and a step allocates nothing. In place is only done where nobody else can
//! see it: a tensor whose storage is shared (an EMA copy, a checkpoint in flight,
//! the caller's clone) is first copied (copy on write, [`Tensor::storage_mut`]),
//! so holders of the old value keep it. An updated parameter gets a fresh id.
//!
//! On the CPU every parameter is updated in one parallel pass (rayon) over chunks of
//! all of them. On CUDA one multi-tensor kernel (`sgd_multi_f32`, kernels/sgd.cu)
//! updates every parameter in one launch over a pointer table. The table is uploaded
//! once and cached: it is rebuilt every step and uploaded again only if it differs
//! (a buffer was replaced). Gradients come fresh from the autograd each step (new
//! buffers), so the table does not point at them: each gradient is first copied
//! (device to device, no host involvement) into a persistent per-parameter staging
//! buffer owned by the optimizer, and the table points at those. A gradient the
//! caller declares fixed ([`Sgd::step_fixed_grads`]: a captured backward graph
//! writes it into the same buffer every step) is read where it lies, no copy.

use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{CpuStorage, DType, Element, Storage, Tensor};
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
    /// CUDA only: the persistent buffer gradient `i` is copied into before the
    /// update, so the pointer table stays the same from step to step.
    grad_stage: Vec<Option<Tensor>>,
    /// CUDA only: per device ordinal, the last pointer table and its device copy.
    tables: Vec<(usize, Vec<i64>, Tensor)>,
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
            grad_stage: Vec::new(),
            tables: Vec::new(),
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
        self.step_fixed_grads(params, grads, &[])
    }

    /// [`Sgd::step_optional`] where `fixed[i]` says that gradient `i` lies in a
    /// buffer that is the same from step to step and that nothing frees or reuses
    /// between steps (the output of a captured backward graph,
    /// [`crate::detection::graphed_train`]). On CUDA the pointer table then points
    /// at that buffer itself: no staging copy for it, and the table stays the same.
    /// Missing entries of `fixed` are `false`; on the CPU it changes nothing.
    pub fn step_fixed_grads(
        &mut self,
        params: &mut [Tensor],
        grads: &[Option<&Tensor>],
        fixed: &[bool],
    ) -> Result<()> {
        if fixed.len() > params.len() {
            return Err(Error::invalid(
                "Sgd::step",
                format!(
                    "{} fixed flags for {} parameters",
                    fixed.len(),
                    params.len()
                ),
            ));
        }
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
        // Everything this step allocates on a device (momentum and staging
        // buffers, the pointer table, parameters made exclusive) outlives it.
        let _long = crate::device::alloc::long_lived();
        // Check everything before writing anything, so an error leaves the
        // parameters and buffers as they were.
        let momentum = self.cfg.momentum != 0.0;
        let mut conformed: Vec<Option<Tensor>> = vec![None; params.len()];
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            check_grad(i, p, g)?;
            if p.dtype() == DType::I64 || p.dtype() == DType::BF16 {
                return Err(Error::DType {
                    op: "Sgd::step",
                    dtype: p.dtype().to_string(),
                    msg: format!("parameter {i} must be f32 or f64"),
                });
            }
            if p.device().is_cuda() && p.dtype() != DType::F32 {
                return Err(Error::DType {
                    op: "Sgd::step",
                    dtype: p.dtype().to_string(),
                    msg: format!("parameter {i} on CUDA must be f32"),
                });
            }
            if momentum {
                if let Some(Some(b)) = self.buffers.get(i) {
                    conformed[i] = Some(conform(b, p, i)?);
                }
            }
        }
        self.buffers.resize(params.len(), None);
        self.grad_stage.resize(params.len(), None);
        let mut items: Vec<Item> = Vec::new();
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            own(&mut params[i])?;
            // The conformed buffer replaces the stored one (same tensor when it
            // was already on the right device and dtype), then is made exclusive.
            let first = conformed[i].is_none();
            if momentum {
                let mut b = match conformed[i].take() {
                    Some(b) => b,
                    None => empty_like(&params[i])?,
                };
                self.buffers[i] = None;
                own(&mut b)?;
                self.buffers[i] = Some(b);
            }
            items.push(Item {
                index: i,
                g: (*g).clone(),
                first,
                fixed: fixed.get(i).copied().unwrap_or(false),
            });
        }
        let cpu: Vec<&Item> = items
            .iter()
            .filter(|it| !params[it.index].device().is_cuda())
            .collect();
        cpu_step_all(&self.cfg, params, &mut self.buffers, &cpu)?;
        let mut devices: Vec<Device> = Vec::new();
        for it in &items {
            let d = params[it.index].device();
            if d.is_cuda() && !devices.contains(&d) {
                devices.push(d);
            }
        }
        for device in devices {
            let mine: Vec<&Item> = items
                .iter()
                .filter(|it| params[it.index].device() == device)
                .collect();
            self.gpu_step_device(params, &mine)?;
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

/// One parameter of a step: its index, gradient, and whether its momentum buffer
/// starts now (PyTorch's first step: `buf = d`).
struct Item {
    index: usize,
    g: Tensor,
    first: bool,
    /// The gradient's buffer is the same every step (see [`Sgd::step_fixed_grads`]).
    fixed: bool,
}

/// Make `t`'s storage exclusive (copy on write): unchanged if nobody else holds it,
/// else replaced by a private copy of the same value.
fn own(t: &mut Tensor) -> Result<()> {
    if t.storage_mut().is_some() {
        return Ok(());
    }
    let copy = match t.storage() {
        Storage::Cuda(g) => {
            let c = Tensor::from_gpu_typed(
                g.dev.clone(),
                g.dev.alloc(g.buf.bytes())?,
                t.shape().clone(),
                t.dtype(),
            );
            g.dev
                .backend
                .copy_dtod(&g.buf, &c.gpu()?.buf, g.buf.bytes())?;
            c
        }
        Storage::Cpu(_) => match t.dtype() {
            DType::F64 => Tensor::from_vec(t.cpu_slice::<f64>()?.to_vec(), t.shape().clone())?,
            _ => Tensor::from_vec(t.cpu_slice::<f32>()?.to_vec(), t.shape().clone())?,
        },
    };
    *t = copy;
    Ok(())
}

/// A tensor of `p`'s shape, dtype and device with unspecified contents (a new
/// momentum buffer, written before it is read).
fn empty_like(p: &Tensor) -> Result<Tensor> {
    match p.storage() {
        Storage::Cuda(g) => Tensor::gpu_empty(&g.dev, p.shape().clone()),
        Storage::Cpu(_) => {
            with_dtype!(p.dtype(), T => Tensor::from_vec(crate::tensor::pool::take::<T>(p.numel()), p.shape().clone()))
        }
    }
}

/// The address of `t`'s host elements as `T`, for the in-place pass; `t` must be
/// exclusive (see [`own`]).
fn cpu_mut_ptr<T: Element>(t: &mut Tensor) -> Result<SharedMut<T>> {
    let shape = t.shape().to_string();
    match t.storage_mut() {
        Some(Storage::Cpu(CpuStorage::F32(v))) if T::DTYPE == DType::F32 => Ok(SharedMut(
            bytemuck::cast_slice_mut::<f32, T>(v).as_mut_ptr(),
        )),
        Some(Storage::Cpu(CpuStorage::F64(v))) if T::DTYPE == DType::F64 => Ok(SharedMut(
            bytemuck::cast_slice_mut::<f64, T>(v).as_mut_ptr(),
        )),
        _ => Err(Error::invalid(
            "Sgd::step",
            format!(
                "tensor {shape} is not exclusive host storage of {}",
                T::DTYPE
            ),
        )),
    }
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

/// Every CPU parameter's update in one parallel pass, per float type.
fn cpu_step_all(
    cfg: &SgdConfig,
    params: &mut [Tensor],
    buffers: &mut [Option<Tensor>],
    items: &[&Item],
) -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let of: Vec<&Item> = items
            .iter()
            .copied()
            .filter(|it| params[it.index].dtype() == dtype)
            .collect();
        if of.is_empty() {
            continue;
        }
        with_dtype!(dtype, T => cpu_pass::<T>(cfg, params, buffers, &of)?);
    }
    Ok(())
}

/// The parameters are cut into chunks of [`SGD_CHUNK`] elements; each task reads
/// `p`, `g`, `buf` of its chunk and writes `p` and `buf` back in place (PyTorch's SGD
/// element formula: weight decay, dampened momentum, Nesterov). Nothing is
/// allocated: the parameters and buffers were made exclusive by the caller.
fn cpu_pass<T: Element>(
    cfg: &SgdConfig,
    params: &mut [Tensor],
    buffers: &mut [Option<Tensor>],
    items: &[&Item],
) -> Result<()> {
    use rayon::prelude::*;
    let (lr, m, wd) = (T::of(cfg.lr), T::of(cfg.momentum), T::of(cfg.weight_decay));
    let keep = T::of(1.0 - cfg.dampening);
    let momentum = cfg.momentum != 0.0;
    struct Views<'a, T> {
        n: usize,
        g: &'a [T],
        p: SharedMut<T>,
        buf: Option<SharedMut<T>>,
        first: bool,
    }
    let mut views = Vec::with_capacity(items.len());
    for it in items {
        let n = params[it.index].numel();
        let p = cpu_mut_ptr::<T>(&mut params[it.index])?;
        let buf = match (momentum, buffers[it.index].as_mut()) {
            (true, Some(b)) => Some(cpu_mut_ptr::<T>(b)?),
            _ => None,
        };
        views.push(Views {
            n,
            g: it.g.cpu_slice::<T>()?,
            p,
            buf,
            first: it.first,
        });
    }
    let chunks: Vec<(usize, usize)> = views
        .iter()
        .enumerate()
        .flat_map(|(k, v)| (0..v.n).step_by(SGD_CHUNK).map(move |s| (k, s)))
        .collect();
    chunks.par_iter().for_each(|&(k, start)| {
        let v = &views[k];
        let end = v.n.min(start + SGD_CHUNK);
        // SAFETY: the chunk [start, end) of item k is touched by this task alone; the
        // parameter's storage is exclusive (no other tensor reads it) and outlives
        // the loop, which holds `params` mutably borrowed.
        let p = unsafe { std::slice::from_raw_parts_mut(v.p.0.add(start), end - start) };
        let g = &v.g[start..end];
        // SAFETY: as above, for the momentum buffer of item k.
        let buf = v
            .buf
            .map(|b| unsafe { std::slice::from_raw_parts_mut(b.0.add(start), end - start) });
        // The branches are hoisted out of the element loops (so they vectorise); the
        // element formula is the same in every variant.
        if cfg.weight_decay != 0.0 {
            update::<T, true>(p, g, buf, v.first, lr, m, wd, keep, cfg.nesterov);
        } else {
            update::<T, false>(p, g, buf, v.first, lr, m, wd, keep, cfg.nesterov);
        }
    });
    Ok(())
}

/// One chunk's update, in place: `d = g (+ wd * p)`; with a momentum buffer
/// `buf = first ? d : m * buf + keep * d` and `d = nesterov ? d + m * buf : buf`;
/// `p -= lr * d`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update<T: Element, const WD: bool>(
    p: &mut [T],
    g: &[T],
    buf: Option<&mut [T]>,
    first: bool,
    lr: T,
    m: T,
    wd: T,
    keep: T,
    nesterov: bool,
) {
    let d = |g: T, p: T| if WD { g + wd * p } else { g };
    match buf {
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                *p = *p - lr * d(g, *p);
            }
        }
        Some(buf) => {
            let it = p.iter_mut().zip(g).zip(buf.iter_mut());
            match (first, nesterov) {
                (true, false) => it.for_each(|((p, &g), b)| {
                    *b = d(g, *p);
                    *p -= lr * *b;
                }),
                (true, true) => it.for_each(|((p, &g), b)| {
                    let di = d(g, *p);
                    *b = di;
                    *p -= lr * (di + m * *b);
                }),
                (false, false) => it.for_each(|((p, &g), b)| {
                    *b = m * *b + keep * d(g, *p);
                    *p -= lr * *b;
                }),
                (false, true) => it.for_each(|((p, &g), b)| {
                    let di = d(g, *p);
                    *b = m * *b + keep * di;
                    *p -= lr * (di + m * *b);
                }),
            }
        }
    }
}

/// Fields per parameter in the pointer table of `sgd_multi_f32` (SGD_FIELDS in
/// kernels/sgd.cu).
const SGD_FIELDS: usize = 8;

impl Sgd {
    /// The CUDA parameters of one device: gradients copied into the persistent
    /// staging buffers, then one `sgd_multi_f32` launch over the pointer table,
    /// which is uploaded only when it differs from the last one of this device.
    fn gpu_step_device(&mut self, params: &mut [Tensor], items: &[&Item]) -> Result<()> {
        let Some(first) = items.first() else {
            return Ok(());
        };
        let dev = gpu_dev("Sgd::step", &params[first.index])?;
        let ptr = |t: &Tensor| -> Result<i64> { Ok(t.gpu()?.buf.ptr() as i64) };
        let mut table: Vec<i64> = Vec::with_capacity(items.len() * SGD_FIELDS);
        let mut total = 0usize;
        for it in items {
            let i = it.index;
            let p = &params[i];
            let n = p.numel();
            if n == 0 {
                continue;
            }
            let grad_ptr = if it.fixed {
                // Read where it lies: its buffer outlives the step (the caller's word).
                self.grad_stage[i] = None;
                ptr(&it.g)?
            } else {
                let fits = matches!(&self.grad_stage[i],
                    Some(s) if s.device() == p.device() && s.shape() == p.shape());
                if !fits {
                    self.grad_stage[i] = Some(Tensor::gpu_empty(&dev, p.shape().clone())?);
                }
                // Just made above when missing.
                let stage = self.grad_stage[i].as_ref().expect("staging buffer");
                dev.backend
                    .copy_dtod(&it.g.gpu()?.buf, &stage.gpu()?.buf, n * 4)?;
                ptr(stage)?
            };
            let p_ptr = ptr(p)?;
            // Without momentum the buffer fields point at p: the kernel never
            // reads or writes them then.
            let buf_ptr = match &self.buffers[i] {
                Some(b) if self.cfg.momentum != 0.0 => ptr(b)?,
                _ => p_ptr,
            };
            // Without dampening, a first step is a later step from a zero buffer
            // (`momentum * 0 + d` is `d`): the new buffer is zeroed and the table
            // says "later step", so the first step's table is every step's (one
            // upload, in the warm-up step; see crate::device::alloc).
            let first = if it.first && self.cfg.dampening == 0.0 && buf_ptr != p_ptr {
                if let Some(b) = &self.buffers[i] {
                    dev.backend.memset(&b.gpu()?.buf, 0)?;
                }
                false
            } else {
                it.first
            };
            table.extend([
                p_ptr,
                grad_ptr,
                buf_ptr,
                p_ptr,
                buf_ptr,
                n as i64,
                total as i64,
                first as i64,
            ]);
            total += n;
        }
        let rows = table.len() / SGD_FIELDS;
        if rows == 0 {
            return Ok(());
        }
        if rows > i32::MAX as usize {
            return Err(Error::invalid("Sgd::step", format!("{rows} parameters")));
        }
        let cached = self
            .tables
            .iter()
            .position(|(o, t, _)| *o == dev.ordinal && *t == table);
        let device_table = match cached {
            Some(k) => self.tables[k].2.clone(),
            None => {
                // The old table first, so the new one can take its block.
                self.tables.retain(|(o, _, _)| *o != dev.ordinal);
                let t = Tensor::from_vec_i64(table.clone(), [rows * SGD_FIELDS])?
                    .to_device(params[first.index].device())?;
                self.tables.push((dev.ordinal, table, t.clone()));
                t
            }
        };
        // Every buffer the table points at is held by `params`, `self.buffers` and
        // `self.grad_stage`, which later steps reuse in stream order.
        launch_elems(
            &dev,
            "sgd_multi_f32",
            total,
            &[
                arg(&device_table)?,
                KernelArg::I32(rows as i32),
                KernelArg::I64(total as i64),
                KernelArg::F32(self.cfg.lr as f32),
                KernelArg::F32(self.cfg.momentum as f32),
                KernelArg::F32(self.cfg.weight_decay as f32),
                KernelArg::F32((1.0 - self.cfg.dampening) as f32),
                KernelArg::I32(self.cfg.nesterov as i32),
            ],
        )
    }
}

impl crate::runner::Optimizer for Sgd {
    fn step(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Option::as_ref).collect();
        self.step_optional(params, &grads)
    }
    fn step_fixed(
        &mut self,
        params: &mut [Tensor],
        grads: &[Option<Tensor>],
        fixed: &[bool],
    ) -> Result<()> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Option::as_ref).collect();
        self.step_fixed_grads(params, &grads, fixed)
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
