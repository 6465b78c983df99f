//! Batch normalisation over the channels of `[N, C, H, W]` (any `[N, C, *]`):
//! `frozen_batch_norm` (torchvision's FrozenBatchNorm2d) and `batch_norm`
//! (`F.batch_norm`, training and eval).
//!
//! Every variant ends as a per-channel affine map `y = x * scale + shift`; they differ
//! in where the mean and variance come from. The backward uses
//! `xhat = (x - mean) * invstd`: `gb = sum(gy)`, `gw = sum(gy * xhat)`, and for the
//! batch statistics of training the full `gx = scale * (gy - gb / M - xhat * gw / M)`
//! with `M = N * H * W` values per channel.

use rayon::prelude::*;

use crate::autograd::record;
use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, DType, Element, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev};

/// `[N, C, *]` seen as N * C planes of `hw` values.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    /// Values per channel.
    fn m(&self) -> usize {
        self.n * self.hw
    }
    fn planes(&self) -> usize {
        self.n * self.c
    }
}

/// Check `x` `[N, C, *]` and the per-channel tensors `[C]`: float, one device, one dtype.
fn check_inputs(op: &'static str, x: &Tensor, per_channel: &[(&str, &Tensor)]) -> Result<Dims> {
    let d = x.dims();
    if d.len() < 2 {
        return Err(Error::shape(
            op,
            format!("input {} is not [N, C, *]", x.shape()),
        ));
    }
    for (name, t) in per_channel {
        if t.dims() != [d[1]] {
            return Err(Error::shape(
                op,
                format!(
                    "{name} {} for input {} (expected [{}])",
                    t.shape(),
                    x.shape(),
                    d[1]
                ),
            ));
        }
    }
    let all: Vec<&Tensor> = std::iter::once(x)
        .chain(per_channel.iter().map(|(_, t)| *t))
        .collect();
    same_device(op, &all)?;
    // bf16 activations come with f32 parameters (the precision policy's f32
    // statistics); the ops that do not take bf16 say so where they dispatch.
    let params: Vec<&Tensor> = per_channel.iter().map(|(_, t)| *t).collect();
    let dt = if params.is_empty() {
        x.dtype()
    } else {
        same_dtype(op, &params)?
    };
    if !(x.dtype() == dt || (x.dtype() == DType::BF16 && dt == DType::F32)) {
        same_dtype(op, &all)?;
    }
    if x.dtype() == DType::I64 || dt == DType::I64 {
        return Err(Error::DType {
            op,
            dtype: "i64".into(),
            msg: format!("input {} must be a float tensor", x.shape()),
        });
    }
    Ok(Dims {
        n: d[0],
        c: d[1],
        hw: d[2..].iter().product(),
    })
}

fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("eps {eps} must be finite and >= 0"),
        ));
    }
    Ok(())
}

/// The per-channel terms of one normalisation, `[C]` each: the mean and `invstd`
/// that define `xhat`, and `y = x * scale + shift`.
#[derive(Clone)]
struct Affine {
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
}

/// FrozenBatchNorm2d: `y = x * scale + shift` with `scale = weight / sqrt(running_var + eps)`
/// and `shift = bias - running_mean * scale`, computed in that order (torchvision's).
/// x `[N, C, H, W]` (any `[N, C, *]`), the others `[C]`; output like x. The backward
/// gives dL/dx and, when they are watched, dL/dweight and dL/dbias; the running
/// statistics get none.
pub fn frozen_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "frozen_batch_norm";
    let d = check_inputs(
        OP,
        x,
        &[
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    check_eps(OP, eps)?;
    let aff = affine_from_stats(weight, bias, running_mean, running_var, eps)?;
    // bf16 activations: normalised in f32 with the f32 statistics, rounded once, and
    // the tape keeps the bf16 input (widened only in the backward, one layer at a time).
    let y = if x.dtype() == DType::BF16 {
        apply_affine_bf16(x, &aff.scale, &aff.shift, d)?
    } else {
        apply_affine(x, &aff.scale, &aff.shift, d)?
    };
    let (xc, wc) = (x.clone(), weight.clone());
    record(
        OP,
        &[x, weight, bias, running_mean, running_var],
        &y,
        move |gy, needs| {
            let gy = super::mixed::grad_f32(gy)?;
            let xw = match xc.dtype() {
                DType::BF16 => xc.to_dtype(DType::F32)?,
                _ => xc.clone(),
            };
            let mut g = norm_backward(&gy, &xw, &wc, &aff, d, false, needs)?;
            g.extend([None, None]);
            Ok(g)
        },
    );
    Ok(y)
}

/// Settings of [`batch_norm`]. `Default` is PyTorch's: training, momentum 0.1, eps 1e-5.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Normalise with the batch statistics and update the running ones (else use the
    /// running statistics).
    pub training: bool,
    /// Weight of the new batch statistic in the running average.
    pub momentum: f64,
    /// Added to the variance before the square root.
    pub eps: f64,
}

impl BatchNormConfig {
    /// Training mode, momentum 0.1, eps 1e-5.
    pub fn train() -> Self {
        BatchNormConfig {
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        }
    }
    /// Eval mode (running statistics), eps 1e-5.
    pub fn eval() -> Self {
        BatchNormConfig {
            training: false,
            ..Self::train()
        }
    }
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self::train()
    }
}

/// What [`batch_norm`] returns: tensors are immutable, so the updated running
/// statistics come back as new tensors (the inputs, unchanged, in eval mode).
#[derive(Clone, Debug)]
pub struct BatchNormOutput {
    /// The normalised output, shaped like x.
    pub y: Tensor,
    /// `momentum * batch_mean + (1 - momentum) * running_mean`, `[C]`.
    pub running_mean: Tensor,
    /// `momentum * unbiased_batch_var + (1 - momentum) * running_var`, `[C]`.
    pub running_var: Tensor,
}

/// `F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`.
///
/// x `[N, C, H, W]` (any `[N, C, *]`), the others `[C]`. Training normalises each
/// channel with its batch mean and biased variance over the N * H * W values, and
/// updates the running variance with the unbiased one (PyTorch's rule); it needs more
/// than one value per channel. Eval uses the running statistics. Differentiable in
/// x, weight and bias (the full batch-statistics backward in training).
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    cfg: BatchNormConfig,
) -> Result<BatchNormOutput> {
    const OP: &str = "batch_norm";
    let d = check_inputs(
        OP,
        x,
        &[
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    check_eps(OP, cfg.eps)?;
    if !cfg.momentum.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("momentum {} must be finite", cfg.momentum),
        ));
    }
    let (aff, running_mean, running_var) = if cfg.training {
        if d.m() <= 1 {
            return Err(Error::invalid(
                OP,
                format!(
                    "training needs more than one value per channel, input {}",
                    x.shape()
                ),
            ));
        }
        let m = moments(x, d, running_mean, running_var, cfg.momentum)?;
        let aff = affine_from_stats(weight, bias, &m.mean, &m.var, cfg.eps)?;
        (aff, m.running_mean, m.running_var)
    } else {
        let aff = affine_from_stats(weight, bias, running_mean, running_var, cfg.eps)?;
        (aff, running_mean.clone(), running_var.clone())
    };
    let y = apply_affine(x, &aff.scale, &aff.shift, d)?;
    let (xc, wc, training) = (x.clone(), weight.clone(), cfg.training);
    record(OP, &[x, weight, bias], &y, move |gy, needs| {
        norm_backward(gy, &xc, &wc, &aff, d, training, needs)
    });
    Ok(BatchNormOutput {
        y,
        running_mean,
        running_var,
    })
}

/// `[dL/dx, dL/dweight, dL/dbias]`, each only where `needs` asks. `training` selects
/// the backward through the batch statistics (mean and invstd depend on x).
fn norm_backward(
    gy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    aff: &Affine,
    d: Dims,
    training: bool,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    check_same(x, gy)?;
    let need_sums = needs[1] || needs[2] || (training && needs[0]);
    let terms = if need_sums {
        Some(grad_terms(x, gy, aff, d)?)
    } else {
        None
    };
    let gx = match (&terms, needs[0]) {
        (_, false) => None,
        (Some(t), true) if training => Some(backward_x(x, gy, aff, t, d)?),
        _ => {
            // A frozen norm's backward every step: on a GPU the zero shift is a cached
            // device constant (read only), not a host upload per layer per step.
            let zero = match weight.device() {
                Device::Cuda(_) => {
                    let dev = gpu_dev("batch_norm_backward", weight)?;
                    let buf = dev.constant(&vec![0u8; d.c * weight.dtype().size()])?;
                    Tensor::from_gpu_typed(dev, buf, [d.c], weight.dtype())
                }
                Device::Cpu => Tensor::zeros([d.c], weight.dtype(), Device::Cpu)?,
            };
            Some(apply_affine(gy, &aff.scale, &zero, d)?)
        }
    };
    let (gw, gb) = match terms {
        Some(t) => (needs[1].then_some(t.gweight), needs[2].then_some(t.gbias)),
        None => (None, None),
    };
    Ok(vec![gx, gw, gb])
}

// ---------------------------------------------------------------------------------
// Device dispatch of the building blocks.

/// `invstd = 1 / sqrt(var + eps)`, `scale = weight / sqrt(var + eps)`,
/// `shift = bias - mean * scale`.
fn affine_from_stats(
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Affine> {
    let c = weight.numel();
    let (invstd, scale, shift) = match weight.device() {
        Device::Cpu => with_dtype!(weight.dtype(), T => {
            let (w, b) = (weight.cpu_slice::<T>()?, bias.cpu_slice::<T>()?);
            let (m, v) = (mean.cpu_slice::<T>()?, var.cpu_slice::<T>()?);
            let mut out = (Vec::with_capacity(c), Vec::with_capacity(c), Vec::with_capacity(c));
            for k in 0..c {
                let s = (v[k] + T::of(eps)).sqrt();
                let scale = w[k] / s;
                out.0.push(T::of(1.0) / s);
                out.1.push(scale);
                out.2.push(b[k] - m[k] * scale);
            }
            (Tensor::from_vec(out.0, [c])?, Tensor::from_vec(out.1, [c])?, Tensor::from_vec(out.2, [c])?)
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("batch_norm", weight)?;
            let [invstd, scale, shift] = gpu_vectors(&dev, c)?;
            dev.launch(
                "norm_scale_shift_f32",
                LaunchCfg::for_elems(c),
                &[
                    arg(weight)?,
                    arg(bias)?,
                    arg(mean)?,
                    arg(var)?,
                    arg(&invstd)?,
                    arg(&scale)?,
                    arg(&shift)?,
                    KernelArg::F32(eps as f32),
                    KernelArg::I32(c as i32),
                ],
            )?;
            (invstd, scale, shift)
        }
    };
    Ok(Affine {
        mean: mean.clone(),
        invstd,
        scale,
        shift,
    })
}

/// `y = x * scale[c] + shift[c]` plane by plane.
fn apply_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, d: Dims) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let (xs, a, b) = (x.cpu_slice::<T>()?, scale.cpu_slice::<T>()?, shift.cpu_slice::<T>()?);
            Tensor::from_vec(cpu_affine(xs, a, b, d), x.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("batch_norm", x)?;
            let y = Tensor::gpu_empty(&dev, x.shape().clone())?;
            launch_planes(
                &dev,
                "channel_affine_f32",
                d,
                &[arg(x)?, arg(scale)?, arg(shift)?, arg(&y)?],
            )?;
            Ok(y)
        }
    }
}

/// [`apply_affine`] on a bf16 `x` with f32 `scale` and `shift`: each value is the f32
/// result rounded to bf16 (the CPU widens, runs the f32 affine and rounds; CUDA reads
/// and writes bf16).
fn apply_affine_bf16(x: &Tensor, scale: &Tensor, shift: &Tensor, d: Dims) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => super::mixed::cpu_bf16_rule(&[x], |v| apply_affine(&v[0], scale, shift, d)),
        Device::Cuda(_) => {
            let dev = super::mixed::gpu_dev_bf16("frozen_batch_norm", x)?;
            let y = super::mixed::gpu_empty_bf16(&dev, x.dims())?;
            launch_planes(
                &dev,
                "channel_affine_bf16",
                d,
                &[arg(x)?, arg(scale)?, arg(shift)?, arg(&y)?],
            )?;
            Ok(y)
        }
    }
}

/// Batch statistics (`[C]` each) and the updated running ones.
struct Moments {
    mean: Tensor,
    /// Biased (divided by M), for the normalisation.
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

fn moments(x: &Tensor, d: Dims, rm: &Tensor, rv: &Tensor, momentum: f64) -> Result<Moments> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => cpu_moments::<T>(x, d, rm, rv, momentum)),
        Device::Cuda(_) => gpu_moments(x, d, rm, rv, momentum),
    }
}

/// Per-channel gradient terms: dL/dweight, dL/dbias, and for the training backward
/// `k1 = sum(gy) / M` and `k2 = sum(gy * (x - mean)) * invstd^2 / M`.
struct GradTerms {
    gweight: Tensor,
    gbias: Tensor,
    k1: Tensor,
    k2: Tensor,
}

fn grad_terms(x: &Tensor, gy: &Tensor, aff: &Affine, d: Dims) -> Result<GradTerms> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => cpu_grad_terms::<T>(x, gy, aff, d)),
        Device::Cuda(_) => gpu_grad_terms(x, gy, aff, d),
    }
}

/// dL/dx through the batch statistics: `scale * (gy - k1 - (x - mean) * k2)`.
fn backward_x(x: &Tensor, gy: &Tensor, aff: &Affine, t: &GradTerms, d: Dims) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let terms = [
                aff.mean.cpu_slice::<T>()?,
                aff.scale.cpu_slice::<T>()?,
                t.k1.cpu_slice::<T>()?,
                t.k2.cpu_slice::<T>()?,
            ];
            let gx = cpu_backward_x(x.cpu_slice::<T>()?, gy.cpu_slice::<T>()?, terms, d);
            Tensor::from_vec(gx, x.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("batch_norm_backward", x)?;
            let gx = Tensor::gpu_empty(&dev, x.shape().clone())?;
            launch_planes(
                &dev,
                "batch_norm_bwd_x_f32",
                d,
                &[
                    arg(x)?,
                    arg(gy)?,
                    arg(&aff.mean)?,
                    arg(&aff.scale)?,
                    arg(&t.k1)?,
                    arg(&t.k2)?,
                    arg(&gx)?,
                ],
            )?;
            Ok(gx)
        }
    }
}

fn check_same(x: &Tensor, gy: &Tensor) -> Result<()> {
    const OP: &str = "batch_norm_backward";
    if x.shape() != gy.shape() {
        return Err(Error::shape(
            OP,
            format!("gy {} for input {}", gy.shape(), x.shape()),
        ));
    }
    same_device(OP, &[x, gy])?;
    same_dtype(OP, &[x, gy])?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// CPU: plain loops, planes or channels in parallel, channel sums in f64.

fn cpu_affine<T: Element>(x: &[T], scale: &[T], shift: &[T], d: Dims) -> Vec<T> {
    // Every element is written: a recycled buffer from the host pool will do.
    let mut y = crate::tensor::pool::take::<T>(x.len());
    if d.hw == 0 {
        return y;
    }
    y.par_chunks_mut(d.hw).enumerate().for_each(|(p, yp)| {
        let (a, b) = (scale[p % d.c], shift[p % d.c]);
        let xp = &x[p * d.hw..(p + 1) * d.hw];
        for (o, &v) in yp.iter_mut().zip(xp) {
            *o = v * a + b;
        }
    });
    y
}

/// The values of channel `c`, one plane per batch item.
fn channel_planes<T>(x: &[T], d: Dims, c: usize) -> impl Iterator<Item = &[T]> {
    (0..d.n).map(move |n| &x[(n * d.c + c) * d.hw..(n * d.c + c + 1) * d.hw])
}

fn cpu_moments<T: Element>(
    x: &Tensor,
    d: Dims,
    rm: &Tensor,
    rv: &Tensor,
    momentum: f64,
) -> Result<Moments> {
    let xs = x.cpu_slice::<T>()?;
    let m = d.m() as f64;
    // Two passes per channel: the mean, then the squared deviations from it.
    let stats: Vec<(f64, f64)> = (0..d.c)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = channel_planes(xs, d, c).flatten().map(|v| v.f64()).sum();
            let mean = sum / m;
            let ss: f64 = channel_planes(xs, d, c)
                .flatten()
                .map(|v| (v.f64() - mean).powi(2))
                .sum();
            (mean, ss)
        })
        .collect();
    let (rm, rv) = (rm.cpu_slice::<T>()?, rv.cpu_slice::<T>()?);
    let mom = T::of(momentum);
    let keep = T::of(1.0 - momentum);
    let mean: Vec<T> = stats.iter().map(|s| T::of(s.0)).collect();
    let var: Vec<T> = stats.iter().map(|s| T::of(s.1 / m)).collect();
    let new_rm: Vec<T> = (0..d.c).map(|c| mom * mean[c] + keep * rm[c]).collect();
    let new_rv: Vec<T> = (0..d.c)
        .map(|c| mom * T::of(stats[c].1 / (m - 1.0)) + keep * rv[c])
        .collect();
    Ok(Moments {
        mean: Tensor::from_vec(mean, [d.c])?,
        var: Tensor::from_vec(var, [d.c])?,
        running_mean: Tensor::from_vec(new_rm, [d.c])?,
        running_var: Tensor::from_vec(new_rv, [d.c])?,
    })
}

fn cpu_grad_terms<T: Element>(x: &Tensor, gy: &Tensor, aff: &Affine, d: Dims) -> Result<GradTerms> {
    let (xs, gs) = (x.cpu_slice::<T>()?, gy.cpu_slice::<T>()?);
    let (mean, invstd) = (aff.mean.cpu_slice::<T>()?, aff.invstd.cpu_slice::<T>()?);
    let sums: Vec<(f64, f64)> = (0..d.c)
        .into_par_iter()
        .map(|c| {
            let mu = mean[c].f64();
            channel_planes(xs, d, c)
                .flatten()
                .zip(channel_planes(gs, d, c).flatten())
                .fold((0.0, 0.0), |(s1, s2), (x, g)| {
                    (s1 + g.f64(), s2 + g.f64() * (x.f64() - mu))
                })
        })
        .collect();
    let m = d.m() as f64;
    let per_channel = |f: &dyn Fn(usize) -> f64| -> Result<Tensor> {
        Tensor::from_vec((0..d.c).map(|c| T::of(f(c))).collect::<Vec<T>>(), [d.c])
    };
    let inv = |c: usize| invstd[c].f64();
    Ok(GradTerms {
        gweight: per_channel(&|c| sums[c].1 * inv(c))?,
        gbias: per_channel(&|c| sums[c].0)?,
        k1: per_channel(&|c| sums[c].0 / m)?,
        k2: per_channel(&|c| sums[c].1 * inv(c) * inv(c) / m)?,
    })
}

/// `terms` = [mean, scale, k1, k2], each `[C]`.
fn cpu_backward_x<T: Element>(x: &[T], gy: &[T], terms: [&[T]; 4], d: Dims) -> Vec<T> {
    let [mean, scale, k1, k2] = terms;
    let mut gx = vec![T::zero(); x.len()];
    if d.hw == 0 {
        return gx;
    }
    gx.par_chunks_mut(d.hw).enumerate().for_each(|(p, out)| {
        let c = p % d.c;
        let range = p * d.hw..(p + 1) * d.hw;
        for ((o, &xv), &g) in out.iter_mut().zip(&x[range.clone()]).zip(&gy[range]) {
            *o = scale[c] * (g - k1[c] - (xv - mean[c]) * k2[c]);
        }
    });
    gx
}

// ---------------------------------------------------------------------------------
// CUDA launchers (kernels/norm.cu).

fn gpu_vectors<const K: usize>(dev: &GpuDevice, c: usize) -> Result<[Tensor; K]> {
    let mut v = Vec::with_capacity(K);
    for _ in 0..K {
        v.push(Tensor::gpu_empty(dev, [c])?);
    }
    Ok(v.try_into()
        .unwrap_or_else(|_| unreachable!("K tensors were pushed")))
}

/// A launch over N * C planes: blockIdx.y walks planes, blockIdx.x and threads walk
/// the values of a plane. Args are followed by `planes, C, hw`.
fn launch_planes(dev: &GpuDevice, kernel: &str, d: Dims, args: &[KernelArg]) -> Result<()> {
    if d.planes() == 0 || d.hw == 0 {
        return Ok(());
    }
    let cfg = LaunchCfg {
        grid: (
            d.hw.div_ceil(256 * 4).clamp(1, 128) as u32,
            d.planes().min(65535) as u32,
            1,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let mut all = args.to_vec();
    all.extend([
        KernelArg::I64(d.planes() as i64),
        KernelArg::I32(d.c as i32),
        KernelArg::I64(d.hw as i64),
    ]);
    dev.launch(kernel, cfg, &all)
}

/// Blocks per channel of the two-stage channel reductions: enough to fill the GPU
/// when C is small, at most 64 partials per channel to merge.
fn reduction_parts(d: Dims) -> usize {
    d.m().div_ceil(256 * 16).clamp(1, 64)
}

/// Grid (C, parts) of 256 threads; args are followed by `N, C, hw, parts`.
fn launch_channel_partials(
    dev: &GpuDevice,
    kernel: &str,
    d: Dims,
    parts: usize,
    args: &[KernelArg],
) -> Result<()> {
    if d.c == 0 {
        return Ok(());
    }
    let cfg = LaunchCfg {
        grid: (d.c as u32, parts as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let mut all = args.to_vec();
    all.extend([
        KernelArg::I64(d.n as i64),
        KernelArg::I32(d.c as i32),
        KernelArg::I64(d.hw as i64),
        KernelArg::I32(parts as i32),
    ]);
    dev.launch(kernel, cfg, &all)
}

fn gpu_moments(x: &Tensor, d: Dims, rm: &Tensor, rv: &Tensor, momentum: f64) -> Result<Moments> {
    let dev = gpu_dev("batch_norm", x)?;
    let parts = reduction_parts(d);
    // (count, mean, M2) per block: Welford states merged by the final kernel.
    let partial = Tensor::gpu_empty(&dev, [d.c * parts * 3])?;
    launch_channel_partials(
        &dev,
        "batch_norm_stats_partial_f32",
        d,
        parts,
        &[arg(x)?, arg(&partial)?],
    )?;
    let [mean, var, running_mean, running_var] = gpu_vectors(&dev, d.c)?;
    dev.launch(
        "batch_norm_stats_final_f32",
        LaunchCfg::for_elems(d.c),
        &[
            arg(&partial)?,
            arg(rm)?,
            arg(rv)?,
            arg(&mean)?,
            arg(&var)?,
            arg(&running_mean)?,
            arg(&running_var)?,
            KernelArg::F32(momentum as f32),
            KernelArg::I64(d.m() as i64),
            KernelArg::I32(d.c as i32),
            KernelArg::I32(parts as i32),
        ],
    )?;
    Ok(Moments {
        mean,
        var,
        running_mean,
        running_var,
    })
}

fn gpu_grad_terms(x: &Tensor, gy: &Tensor, aff: &Affine, d: Dims) -> Result<GradTerms> {
    let dev = gpu_dev("batch_norm_backward", x)?;
    let parts = reduction_parts(d);
    // (sum gy, sum gy * (x - mean)) per block.
    let partial = Tensor::gpu_empty(&dev, [d.c * parts * 2])?;
    launch_channel_partials(
        &dev,
        "batch_norm_grad_partial_f32",
        d,
        parts,
        &[arg(x)?, arg(gy)?, arg(&aff.mean)?, arg(&partial)?],
    )?;
    let [gweight, gbias, k1, k2] = gpu_vectors(&dev, d.c)?;
    dev.launch(
        "batch_norm_grad_final_f32",
        LaunchCfg::for_elems(d.c),
        &[
            arg(&partial)?,
            arg(&aff.invstd)?,
            arg(&gweight)?,
            arg(&gbias)?,
            arg(&k1)?,
            arg(&k2)?,
            KernelArg::I64(d.m() as i64),
            KernelArg::I32(d.c as i32),
            KernelArg::I32(parts as i32),
        ],
    )?;
    Ok(GradTerms {
        gweight,
        gbias,
        k1,
        k2,
    })
}

/// Fold a frozen BatchNorm into a per-channel `(scale, shift)`:
/// `scale = weight / sqrt(running_var + eps)`, `shift = bias - running_mean * scale`,
/// computed exactly as [`frozen_batch_norm`] does, so `x * scale + shift` reproduces it
/// bit for bit. Compute once per weight change and reuse (e.g. in a fused conv epilogue).
pub fn fold_frozen_bn(
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "fold_frozen_bn";
    let c = weight.numel();
    for (name, t) in [
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ] {
        if t.dims() != [c] {
            return Err(Error::shape(
                OP,
                format!("{name} {} (expected [{c}])", t.shape()),
            ));
        }
    }
    let all = [weight, bias, running_mean, running_var];
    same_device(OP, &all)?;
    if same_dtype(OP, &all)? == DType::I64 {
        return Err(Error::DType {
            op: OP,
            dtype: "i64".into(),
            msg: "batch-norm statistics must be float tensors".into(),
        });
    }
    check_eps(OP, eps)?;
    let aff = affine_from_stats(weight, bias, running_mean, running_var, eps)?;
    Ok((aff.scale, aff.shift))
}

/// `y[n, c, ..] = x[n, c, ..] * scale[c] + shift[c]` without recording a backward.
/// x `[N, C, *]`, scale and shift `[C]`.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let d = check_inputs("channel_affine", x, &[("scale", scale), ("shift", shift)])?;
    apply_affine(x, scale, shift, d)
}
