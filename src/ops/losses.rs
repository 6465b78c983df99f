//! Detection losses: binary cross-entropy with logits (RPN objectness), softmax
//! cross-entropy (box-head classes), smooth-L1 and L1 (box regression). PyTorch's
//! semantics (`F.binary_cross_entropy_with_logits`, `F.cross_entropy`,
//! `F.smooth_l1_loss`, `F.l1_loss`, no weights, no ignored labels).
//!
//! On CUDA a reduced loss never leaves the device: a fused kernel computes the loss
//! and per-block sums, `sum_final_f32` (kernels/reduce.cu) adds the blocks, and the
//! backward kernels read the scalar upstream gradient from device memory.

use std::str::FromStr;

use num_traits::{One, Zero};
use rayon::prelude::*;

use crate::autograd::{no_grad, record};
use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Element, Shape, Tensor};
use crate::with_dtype;

use super::{arg, check_same_shape, gpu_dev, launch_elems};

/// How a loss reduces its per-element (or per-row) values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Mean over elements (rows for cross-entropy), shape `[]`; NaN when empty.
    #[default]
    Mean,
    /// Sum, shape `[]`.
    Sum,
    /// No reduction: one loss per element (per row for cross-entropy).
    None,
}

impl Reduction {
    /// The factor applied to the sum: `1/n` for [`Reduction::Mean`], else 1.
    fn factor(self, n: usize) -> f64 {
        match self {
            Reduction::Mean => 1.0 / n as f64,
            Reduction::Sum | Reduction::None => 1.0,
        }
    }
}

impl FromStr for Reduction {
    type Err = Error;
    /// PyTorch's spelling: `mean`, `sum` or `none`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            "none" => Ok(Reduction::None),
            _ => Err(Error::invalid(
                "Reduction",
                format!("`{s}`: expected mean, sum or none"),
            )),
        }
    }
}

/// Binary cross-entropy on logits: `max(x, 0) - x t + log(1 + exp(-|x|))` per
/// element, stable for any `x`.
///
/// `logits` and `targets` have the same (any) shape; targets are probabilities in
/// [0, 1]. Differentiable in both. Output `[]`, or the input shape for
/// [`Reduction::None`].
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
    pointwise_loss(
        "bce_with_logits",
        Pointwise::Bce,
        logits,
        targets,
        reduction,
    )
}

/// Smooth-L1 (Huber divided by `beta`), PyTorch's `smooth_l1_loss`: per element
/// `0.5 d² / beta` where `|d| < beta`, `|d| - 0.5 beta` elsewhere, `d = input - target`.
/// `beta == 0` is exactly [`l1_loss`]; a negative or non-finite `beta` is an error.
///
/// Same-shaped inputs, differentiable in both. Output `[]`, or the input shape for
/// [`Reduction::None`].
pub fn smooth_l1(
    input: &Tensor,
    target: &Tensor,
    beta: f64,
    reduction: Reduction,
) -> Result<Tensor> {
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(Error::invalid(
            "smooth_l1",
            format!("beta must be finite and >= 0, got {beta}"),
        ));
    }
    pointwise_loss(
        "smooth_l1",
        Pointwise::SmoothL1(beta),
        input,
        target,
        reduction,
    )
}

/// L1 loss `|input - target|` per element (gradient `sign(d)`, 0 at `d = 0`).
/// Same-shaped inputs, differentiable in both.
pub fn l1_loss(input: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    pointwise_loss(
        "l1_loss",
        Pointwise::SmoothL1(0.0),
        input,
        target,
        reduction,
    )
}

/// Softmax cross-entropy: per row `logsumexp(logits[r]) - logits[r, labels[r]]`.
///
/// `logits` `[N, C]` (float), `labels` `[N]` (i64, each in `[0, C)`; anything else is
/// an error, checked on the device for CUDA tensors). Differentiable in `logits`.
/// Output `[]`, or `[N]` for [`Reduction::None`]; the mean divides by `N`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let device = same_device(OP, &[logits, labels])?;
    check_float(OP, logits)?;
    if labels.dtype() != DType::I64 {
        return Err(Error::DType {
            op: OP,
            dtype: labels.dtype().to_string(),
            msg: "labels must be i64".into(),
        });
    }
    let (n, c) = match logits.dims() {
        &[n, c] if labels.dims() == [n] && c > 0 => (n, c),
        _ => {
            return Err(Error::shape(
                OP,
                format!(
                    "logits {} must be [N, C] with C > 0 and labels {} must be [N]",
                    logits.shape(),
                    labels.shape()
                ),
            ))
        }
    };
    let (rows, lse) = match device {
        Device::Cpu => with_dtype!(logits.dtype(), T => cpu_ce_rows::<T>(logits, labels, n, c))?,
        Device::Cuda(_) => gpu_ce_rows(logits, labels, n, c)?,
    };
    let y = no_grad(|| match reduction {
        Reduction::None => Ok(rows),
        Reduction::Sum => super::sum(&rows),
        Reduction::Mean => super::mean(&rows),
    })?;
    let k = reduction.factor(n);
    let (xc, lc) = (logits.clone(), labels.clone());
    record(OP, &[logits], &y, move |gy, _| {
        Ok(vec![Some(ce_backward(&xc, &lc, &lse, gy, reduction, k)?)])
    });
    Ok(y)
}

// ------------------------------------------------------------------ pointwise losses

/// The elementwise losses; L1 is `SmoothL1(0.0)`.
#[derive(Clone, Copy, Debug)]
enum Pointwise {
    Bce,
    SmoothL1(f64),
}

impl Pointwise {
    fn loss<T: Element>(self, x: T, t: T) -> T {
        match self {
            Pointwise::Bce => x.max(T::zero()) - x * t + (-x.abs()).exp().ln_1p(),
            Pointwise::SmoothL1(beta) => {
                let (z, b) = ((x - t).abs(), T::of(beta));
                if z < b {
                    T::of(0.5) * z * z / b
                } else {
                    z - T::of(0.5) * b
                }
            }
        }
    }

    /// (dloss/dx, dloss/dt).
    fn grad<T: Element>(self, x: T, t: T) -> (T, T) {
        match self {
            Pointwise::Bce => (sigmoid(x) - t, -x),
            Pointwise::SmoothL1(beta) => {
                let (d, b) = (x - t, T::of(beta));
                let g = if d < -b {
                    -T::one()
                } else if d > b {
                    T::one()
                } else if beta == 0.0 {
                    // L1 at d = 0: sign(0) = 0, as PyTorch.
                    T::zero()
                } else {
                    d / b
                };
                (g, -g)
            }
        }
    }

    /// (forward, partial-sum, backward) kernel names.
    fn kernels(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Pointwise::Bce => (
                "bce_logits_fwd_f32",
                "bce_logits_partial_f32",
                "bce_logits_bwd_f32",
            ),
            Pointwise::SmoothL1(_) => (
                "smooth_l1_fwd_f32",
                "smooth_l1_partial_f32",
                "smooth_l1_bwd_f32",
            ),
        }
    }

    /// The kernel arguments that precede the outputs: x, t and, for smooth-L1, beta.
    fn input_args(self, x: &Tensor, t: &Tensor) -> Result<Vec<KernelArg>> {
        let mut a = vec![arg(x)?, arg(t)?];
        if let Pointwise::SmoothL1(beta) = self {
            a.push(KernelArg::F32(beta as f32));
        }
        Ok(a)
    }
}

fn sigmoid<T: Element>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

fn check_float(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::I64 {
        return Err(Error::DType {
            op,
            dtype: "i64".into(),
            msg: format!("tensor {} must be float", t.shape()),
        });
    }
    Ok(())
}

fn pointwise_loss(
    op: &'static str,
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    check_same_shape(op, x, t)?;
    let device = same_device(op, &[x, t])?;
    check_float(op, x)?;
    check_float(op, t)?;
    if x.dtype() != t.dtype() {
        return Err(Error::DType {
            op,
            dtype: t.dtype().to_string(),
            msg: format!("targets mixed with {} inputs", x.dtype()),
        });
    }
    let k = reduction.factor(x.numel());
    let y = match device {
        Device::Cpu => with_dtype!(x.dtype(), T => cpu_pointwise::<T>(kind, x, t, reduction, k))?,
        Device::Cuda(_) => gpu_pointwise(op, kind, x, t, reduction, k)?,
    };
    let (xc, tc) = (x.clone(), t.clone());
    record(op, &[x, t], &y, move |gy, needs| {
        pointwise_backward(op, kind, &xc, &tc, gy, reduction, k, needs)
    });
    Ok(y)
}

/// Sum of `f(i)` for i < n in f64, over fixed chunks so the result does not depend
/// on how rayon splits the work.
fn det_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 1 << 14;
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| (c * CHUNK..((c + 1) * CHUNK).min(n)).map(&f).sum())
        .collect();
    parts.into_iter().sum()
}

fn cpu_pointwise<T: Element>(
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    reduction: Reduction,
    k: f64,
) -> Result<Tensor> {
    let (xs, ts) = (x.cpu_slice::<T>()?, t.cpu_slice::<T>()?);
    if reduction == Reduction::None {
        let mut out = vec![T::zero(); xs.len()];
        crate::device::cpu::fill_indexed(&mut out, |i| kind.loss(xs[i], ts[i]));
        return Tensor::from_vec(out, x.shape().clone());
    }
    let s = det_sum(xs.len(), |i| kind.loss(xs[i], ts[i]).f64());
    Tensor::from_vec(vec![T::of(s * k)], Shape::new(vec![]))
}

fn gpu_pointwise(
    op: &'static str,
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    reduction: Reduction,
    k: f64,
) -> Result<Tensor> {
    let dev = gpu_dev(op, x)?;
    gpu_dev(op, t)?;
    let n = x.numel();
    let (fwd, partial, _) = kind.kernels();
    let mut args = kind.input_args(x, t)?;
    if reduction == Reduction::None {
        let y = Tensor::gpu_empty(&dev, x.shape().clone())?;
        args.extend([arg(&y)?, KernelArg::I64(n as i64)]);
        launch_elems(&dev, fwd, n, &args)?;
        return Ok(y);
    }
    super::reduce::two_pass_sum(&dev, partial, args, n, k)
}

/// Check the upstream gradient of a loss: `[]`-sized for reduced losses, the loss's
/// own shape otherwise; on the inputs' device and dtype.
fn check_upstream(
    op: &'static str,
    gy: &Tensor,
    reduction: Reduction,
    per_elem: &Shape,
    like: &Tensor,
) -> Result<()> {
    let ok = match reduction {
        Reduction::None => gy.shape() == per_elem,
        _ => gy.numel() == 1,
    };
    if !ok {
        return Err(Error::shape(
            op,
            format!(
                "upstream gradient {} for a loss over {per_elem} ({reduction:?})",
                gy.shape()
            ),
        ));
    }
    same_device(op, &[like, gy])?;
    if gy.dtype() != like.dtype() {
        return Err(Error::DType {
            op,
            dtype: gy.dtype().to_string(),
            msg: format!("upstream gradient for {} inputs", like.dtype()),
        });
    }
    Ok(())
}

/// The stride and factor of the upstream gradient: element `i` of the input gets
/// `gy[i * stride] * k`.
fn upstream_stride(reduction: Reduction) -> i64 {
    match reduction {
        Reduction::None => 1,
        _ => 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn pointwise_backward(
    op: &'static str,
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    gy: &Tensor,
    reduction: Reduction,
    k: f64,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    check_upstream(op, gy, reduction, x.shape(), x)?;
    let want_t = needs.get(1).copied().unwrap_or(false);
    match x.device() {
        Device::Cpu => {
            with_dtype!(x.dtype(), T => cpu_pointwise_backward::<T>(kind, x, t, gy, reduction, k, want_t))
        }
        Device::Cuda(_) => gpu_pointwise_backward(op, kind, x, t, gy, reduction, k, want_t),
    }
}

fn cpu_pointwise_backward<T: Element>(
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    gy: &Tensor,
    reduction: Reduction,
    k: f64,
    want_t: bool,
) -> Result<Vec<Option<Tensor>>> {
    let (xs, ts, gs) = (
        x.cpu_slice::<T>()?,
        t.cpu_slice::<T>()?,
        gy.cpu_slice::<T>()?,
    );
    let stride = upstream_stride(reduction) as usize;
    let kt = T::of(k);
    let g = |i: usize| gs[i * stride] * kt;
    let mut gx = vec![T::zero(); xs.len()];
    crate::device::cpu::fill_indexed(&mut gx, |i| kind.grad(xs[i], ts[i]).0 * g(i));
    let gt = if want_t {
        let mut gt = vec![T::zero(); xs.len()];
        crate::device::cpu::fill_indexed(&mut gt, |i| kind.grad(xs[i], ts[i]).1 * g(i));
        Some(Tensor::from_vec(gt, x.shape().clone())?)
    } else {
        None
    };
    Ok(vec![Some(Tensor::from_vec(gx, x.shape().clone())?), gt])
}

#[allow(clippy::too_many_arguments)]
fn gpu_pointwise_backward(
    op: &'static str,
    kind: Pointwise,
    x: &Tensor,
    t: &Tensor,
    gy: &Tensor,
    reduction: Reduction,
    k: f64,
    want_t: bool,
) -> Result<Vec<Option<Tensor>>> {
    let dev = gpu_dev(op, x)?;
    let n = x.numel();
    let gx = Tensor::gpu_empty(&dev, x.shape().clone())?;
    // Without a target gradient the kernel never writes `gt`; gx stands in for it.
    let gt = if want_t {
        Some(Tensor::gpu_empty(&dev, x.shape().clone())?)
    } else {
        None
    };
    let mut args = kind.input_args(x, t)?;
    args.extend([
        arg(gy)?,
        KernelArg::I64(upstream_stride(reduction)),
        KernelArg::F32(k as f32),
        arg(&gx)?,
        arg(gt.as_ref().unwrap_or(&gx))?,
        KernelArg::I32(want_t as i32),
        KernelArg::I64(n as i64),
    ]);
    launch_elems(&dev, kind.kernels().2, n, &args)?;
    Ok(vec![Some(gx), gt])
}

// ------------------------------------------------------------ gathered losses (CPU)

/// `weight * Σ_i bce_with_logits(x_i, targets[i])` over the elements `at[i] = (k,
/// o)` (element `o` of `xs[k]`), summed in `at`'s order in f64: the loss of a few
/// sampled elements read where they lie, without gathering them into a tensor.
/// CPU f32 only. Differentiable in each of `xs`: the gradient is zero except at the
/// listed elements (`weight * upstream * dloss/dx`, in f32 in that order, the
/// value `sum(mul(bce_with_logits(x, t, None), w))` gives there).
pub fn bce_with_logits_at(
    xs: &[&Tensor],
    at: &[(usize, usize)],
    targets: &[f32],
    weight: f32,
) -> Result<Tensor> {
    gathered_loss(
        "bce_with_logits_at",
        Pointwise::Bce,
        xs,
        at,
        targets,
        weight,
    )
}

/// [`bce_with_logits_at`]'s twin for [`smooth_l1`] (`beta` finite, >= 0).
pub fn smooth_l1_at(
    xs: &[&Tensor],
    at: &[(usize, usize)],
    targets: &[f32],
    beta: f64,
    weight: f32,
) -> Result<Tensor> {
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(Error::invalid(
            "smooth_l1_at",
            format!("beta must be finite and >= 0, got {beta}"),
        ));
    }
    gathered_loss(
        "smooth_l1_at",
        Pointwise::SmoothL1(beta),
        xs,
        at,
        targets,
        weight,
    )
}

fn gathered_loss(
    op: &'static str,
    kind: Pointwise,
    xs: &[&Tensor],
    at: &[(usize, usize)],
    targets: &[f32],
    weight: f32,
) -> Result<Tensor> {
    if at.len() != targets.len() {
        return Err(Error::shape(
            op,
            format!("{} elements and {} targets", at.len(), targets.len()),
        ));
    }
    let mut slices = Vec::with_capacity(xs.len());
    for x in xs {
        if x.device() != Device::Cpu || x.dtype() != DType::F32 {
            return Err(Error::DType {
                op,
                dtype: x.dtype().to_string(),
                msg: format!("CPU f32 inputs only, got one on {:?}", x.device()),
            });
        }
        slices.push(x.cpu_slice::<f32>()?);
    }
    if let Some(&(k, o)) = at
        .iter()
        .find(|&&(k, o)| k >= slices.len() || o >= slices[k].len())
    {
        return Err(Error::invalid(
            op,
            format!("element ({k}, {o}) outside the {} inputs", xs.len()),
        ));
    }
    let s: f64 = at
        .iter()
        .zip(targets)
        .map(|(&(k, o), &t)| (kind.loss(slices[k][o], t) * weight) as f64)
        .sum();
    let y = Tensor::from_vec(vec![s as f32], Shape::new(vec![]))?;
    let shapes: Vec<Shape> = xs.iter().map(|x| x.shape().clone()).collect();
    let kept: Vec<Tensor> = xs.iter().map(|&x| x.clone()).collect();
    let (at, targets) = (at.to_vec(), targets.to_vec());
    record(op, xs, &y, move |gy, needs| {
        if gy.numel() != 1 || gy.dtype() != DType::F32 || gy.device() != Device::Cpu {
            return Err(Error::shape(
                op,
                format!("upstream gradient {}", gy.shape()),
            ));
        }
        let g = gy.cpu_slice::<f32>()?[0] * weight;
        let mut grads: Vec<Option<Vec<f32>>> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                needs
                    .get(k)
                    .copied()
                    .unwrap_or(false)
                    .then(|| crate::tensor::pool::take_zeroed::<f32>(s.numel()))
            })
            .collect();
        for (&(k, o), &t) in at.iter().zip(&targets) {
            if let Some(gk) = &mut grads[k] {
                let x = kept[k].cpu_slice::<f32>()?[o];
                gk[o] += kind.grad(x, t).0 * g;
            }
        }
        grads
            .into_iter()
            .zip(shapes)
            .map(|(g, s)| g.map(|g| Tensor::from_vec(g, s)).transpose())
            .collect()
    });
    Ok(y)
}

// ------------------------------------------------------------------ cross-entropy

/// Per-row losses `[N]` and log-sum-exps `[N]` (kept for the backward), CPU.
fn cpu_ce_rows<T: Element>(
    logits: &Tensor,
    labels: &Tensor,
    n: usize,
    c: usize,
) -> Result<(Tensor, Tensor)> {
    let (xs, ls) = (logits.cpu_slice::<T>()?, labels.cpu_i64()?);
    if let Some((r, &l)) = ls
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize >= c)
    {
        return Err(Error::invalid(
            "cross_entropy",
            format!(
                "labels[{r}] = {l} outside [0, {c}) for logits {}",
                logits.shape()
            ),
        ));
    }
    let per_row: Vec<(T, T)> = (0..n)
        .into_par_iter()
        .with_min_len(64)
        .map(|r| {
            let row = &xs[r * c..(r + 1) * c];
            // f64 accumulation: the max shift keeps exp() <= 1, the sum of up to C terms
            // then loses nothing that float32 would keep.
            let m = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.f64()));
            let s: f64 = row.iter().map(|v| (v.f64() - m).exp()).sum();
            let lse = m + s.ln();
            (T::of(lse - row[ls[r] as usize].f64()), T::of(lse))
        })
        .collect();
    let (loss, lse): (Vec<T>, Vec<T>) = per_row.into_iter().unzip();
    Ok((Tensor::from_vec(loss, [n])?, Tensor::from_vec(lse, [n])?))
}

/// Per-row losses and log-sum-exps on the device; reads back one flag to report
/// labels outside `[0, C)`.
fn gpu_ce_rows(logits: &Tensor, labels: &Tensor, n: usize, c: usize) -> Result<(Tensor, Tensor)> {
    let dev = gpu_dev("cross_entropy", logits)?;
    let loss = Tensor::gpu_empty(&dev, [n])?;
    let lse = Tensor::gpu_empty(&dev, [n])?;
    let bad =
        crate::device::error_flags::flag(&dev, "cross_entropy", "labels[{}] outside [0, classes)")?;
    if n > 0 {
        // One warp per row, 8 rows per 256-thread block.
        let blocks = n.div_ceil(8).clamp(1, 65535 * 16) as u32;
        let cfg = LaunchCfg {
            grid: (blocks, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        dev.launch(
            "cross_entropy_fwd_f32",
            cfg,
            &[
                arg(logits)?,
                arg(labels)?,
                arg(&loss)?,
                arg(&lse)?,
                bad.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I64(c as i64),
            ],
        )?;
    }
    bad.finish(&dev, |r| {
        Error::invalid(
            "cross_entropy",
            format!("labels[{r}] outside [0, {c}) for logits {}", logits.shape()),
        )
    })?;
    Ok((loss, lse))
}

fn ce_backward(
    logits: &Tensor,
    labels: &Tensor,
    lse: &Tensor,
    gy: &Tensor,
    reduction: Reduction,
    k: f64,
) -> Result<Tensor> {
    let n = logits.dims()[0];
    check_upstream("cross_entropy", gy, reduction, &Shape::new(vec![n]), logits)?;
    let stride = upstream_stride(reduction);
    match logits.device() {
        Device::Cpu => with_dtype!(logits.dtype(), T => {
            let (xs, ls, lses, gs) = (
                logits.cpu_slice::<T>()?,
                labels.cpu_i64()?,
                lse.cpu_slice::<T>()?,
                gy.cpu_slice::<T>()?,
            );
            let c = logits.dims()[1];
            let kt = T::of(k);
            let mut gx = vec![T::zero(); xs.len()];
            crate::device::cpu::fill_indexed(&mut gx, |i| {
                let (r, j) = (i / c, i % c);
                let onehot = if ls[r] as usize == j { T::one() } else { T::zero() };
                ((xs[i] - lses[r]).exp() - onehot) * (gs[r * stride as usize] * kt)
            });
            Tensor::from_vec(gx, logits.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("cross_entropy", logits)?;
            let gx = Tensor::gpu_empty(&dev, logits.shape().clone())?;
            let (n, c) = (logits.dims()[0], logits.dims()[1]);
            launch_elems(
                &dev,
                "cross_entropy_bwd_f32",
                n * c,
                &[
                    arg(logits)?,
                    arg(labels)?,
                    arg(lse)?,
                    arg(gy)?,
                    KernelArg::I64(stride),
                    KernelArg::F32(k as f32),
                    arg(&gx)?,
                    KernelArg::I64(n as i64),
                    KernelArg::I64(c as i64),
                ],
            )?;
            Ok(gx)
        }
    }
}
