//! SyncBatchNorm: training-mode batch norm whose statistics cover the whole
//! data-parallel batch, with `torch.nn.SyncBatchNorm`'s semantics.
//!
//! Forward: every rank computes, per channel, its value count, mean and sum of squared
//! deviations (`M2`) in f64; one all-gather exchanges them and every rank merges them
//! in rank order (Chan's pairwise update, ranks with no values skipped, as torch
//! filters zero counts), giving the global mean and biased variance that normalise,
//! and the unbiased variance (`M2 / (count - 1)`, global count) for the running
//! estimate. Exchanging `(count, mean, M2)` rather than raw sums of squares keeps the
//! variance free of the cancellation `E[x^2] - E[x]^2` suffers in f32.
//!
//! Backward: every rank computes `sum(gy)` and `sum(gy * (x - mean))` per channel;
//! when the input needs a gradient the two sums are all-reduced (summed in rank order
//! in f64) and give `gx = scale * (gy - S1 / count - (x - mean) * invstd^2 * S2 /
//! count)`, the gradient of the loss summed over ranks. dL/dweight and dL/dbias are
//! this rank's own sums (`S2 * invstd`, `S1`), as in torch: the gradient reducer then
//! averages them with every other parameter.
//!
//! A rank with no images (`N = 0`) still joins both collectives with a zero count and
//! zero sums, gets an empty output and no weight or bias gradient (torch's rule).
//! Unlike torch, which refuses a single value per channel only on one rank, a global
//! count of 1 or less is an error on every rank (the unbiased variance is undefined).
//!
//! Outside training, without a group, or in a world of one rank, it is plain
//! [`batch_norm`] (torch falls back the same way). The statistics travel through host
//! memory: they are `2C + 1` values per layer, and the in-process and TCP collectives
//! work on host buffers.
//!
//! The collectives run on the rank's [`CommStream`], behind any gradient buckets
//! already launched: the backward pass issues both in the same order on every rank.

use std::cell::RefCell;
use std::sync::Arc;

use super::stream::CommStream;
use crate::autograd::record;
use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::norm::{batch_norm, channel_affine, BatchNormConfig, BatchNormOutput};
use crate::ops::{arg, gpu_dev};
use crate::tensor::{same_device, same_dtype, DType, Element, Tensor};
use crate::with_dtype;

const OP: &str = "sync_batch_norm";

thread_local! {
    static GROUP: RefCell<Option<Arc<CommStream>>> = const { RefCell::new(None) };
}

/// Make `group` the SyncBatchNorm group of the calling thread (the thread that runs
/// the model's forward and backward); returns the previous one. `None` turns
/// synchronisation off. [`super::distribute_runner`] installs its stream for the run.
pub fn set_sync_bn_group(group: Option<Arc<CommStream>>) -> Option<Arc<CommStream>> {
    GROUP.with(|g| std::mem::replace(&mut *g.borrow_mut(), group))
}

/// The calling thread's SyncBatchNorm group, if any.
pub fn sync_bn_group() -> Option<Arc<CommStream>> {
    GROUP.with(|g| g.borrow().clone())
}

/// `torch.nn.SyncBatchNorm` over the calling thread's group (see the module docs):
/// x `[N, C, *]` (this rank's part of the batch, `N` may be 0), weight, bias,
/// running_mean, running_var `[C]`. Returns the output shaped like x and the updated
/// running statistics (the same on every rank). Differentiable in x, weight and bias.
pub fn sync_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    cfg: BatchNormConfig,
) -> Result<BatchNormOutput> {
    match sync_bn_group() {
        Some(g) if cfg.training && g.world_size() > 1 => {
            sync_train(g, x, weight, bias, running_mean, running_var, cfg)
        }
        _ => batch_norm(x, weight, bias, running_mean, running_var, cfg),
    }
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    fn count(&self) -> usize {
        self.n * self.hw
    }
}

fn check(x: &Tensor, per_channel: &[(&str, &Tensor)], cfg: BatchNormConfig) -> Result<Dims> {
    let d = x.dims();
    if d.len() < 2 {
        return Err(Error::shape(
            OP,
            format!("input {} is not [N, C, *]", x.shape()),
        ));
    }
    for (name, t) in per_channel {
        if t.dims() != [d[1]] {
            return Err(Error::shape(
                OP,
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
    same_device(OP, &all)?;
    let dtype = same_dtype(OP, &all)?;
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::DType {
            op: OP,
            dtype: dtype.to_string(),
            msg: format!("input {} must be f32 or f64", x.shape()),
        });
    }
    if !(cfg.eps >= 0.0 && cfg.eps.is_finite() && cfg.momentum.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!(
                "eps {} must be finite and >= 0, momentum {} finite",
                cfg.eps, cfg.momentum
            ),
        ));
    }
    Ok(Dims {
        n: d[0],
        c: d[1],
        hw: d[2..].iter().product(),
    })
}

fn to_le(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every rank's `len` f64 values, in rank order; a rank that sent another length is
/// an error (the ranks' models differ).
fn gather_f64(group: &CommStream, local: Vec<f64>, what: &'static str) -> Result<Vec<Vec<f64>>> {
    let len = local.len();
    let parts = group.run(move |c| c.all_gather_bytes(&to_le(&local)))?;
    parts
        .iter()
        .enumerate()
        .map(|(r, b)| {
            if b.len() != len * 8 {
                return Err(Error::Distributed(format!(
                    "{OP}: rank {r} sent {} {what} values where this rank has {len}",
                    b.len() / 8
                )));
            }
            Ok(b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect())
        })
        .collect()
}

/// Merge Welford states `(n, mean, M2)` (Chan et al.), skipping empty ones.
fn merge(acc: &mut (f64, f64, f64), n: f64, mean: f64, m2: f64) {
    if n == 0.0 {
        return;
    }
    let nt = acc.0 + n;
    let delta = mean - acc.1;
    acc.1 += delta * n / nt;
    acc.2 += m2 + delta * delta * acc.0 * n / nt;
    acc.0 = nt;
}

fn sync_train(
    group: Arc<CommStream>,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    cfg: BatchNormConfig,
) -> Result<BatchNormOutput> {
    let d = check(
        x,
        &[
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
        cfg,
    )?;
    // [count, mean[C], M2[C]] of this rank, then of the world.
    let mut local = vec![d.count() as f64];
    let (mean_l, m2_l) = local_moments(x, d)?;
    local.extend(mean_l);
    local.extend(m2_l);
    let parts = gather_f64(&group, local, "statistics")?;
    let mut stats = vec![(0.0, 0.0, 0.0); d.c];
    for p in &parts {
        for (c, s) in stats.iter_mut().enumerate() {
            merge(s, p[0], p[1 + c], p[1 + d.c + c]);
        }
    }
    let total = parts.iter().map(|p| p[0]).sum::<f64>();
    if total <= 1.0 {
        return Err(Error::invalid(
            OP,
            format!(
                "training needs more than one value per channel over all ranks; \
                 {total} in all, input {} on this rank",
                x.shape()
            ),
        ));
    }
    let dev = x.device();
    let (aff, running_mean, running_var) = with_dtype!(x.dtype(), T => {
        affine::<T>(&stats, total, weight, bias, running_mean, running_var, cfg, dev)?
    });
    let y = channel_affine(x, &aff.scale, &aff.shift)?;
    let xc = x.clone();
    record(OP, &[x, weight, bias], &y, move |gy, needs| {
        backward(&group, gy, &xc, &aff, d, total, needs)
    });
    Ok(BatchNormOutput {
        y,
        running_mean,
        running_var,
    })
}

/// Per-channel normalisation terms, on x's device: the mean that (with `invstd`)
/// defines `xhat`, and `y = x * scale + shift`.
struct Affine {
    mean: Tensor,
    scale: Tensor,
    /// `invstd` on the host, f64 (for the backward's per-channel terms).
    invstd_host: Vec<f64>,
    shift: Tensor,
}

/// The affine map and new running statistics from the merged `(n, mean, M2)` per
/// channel, computed in `T` the way `ops::norm::batch_norm` computes them so that
/// one rank equals plain batch norm.
#[allow(clippy::too_many_arguments)]
fn affine<T: Element>(
    stats: &[(f64, f64, f64)],
    total: f64,
    weight: &Tensor,
    bias: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    cfg: BatchNormConfig,
    dev: Device,
) -> Result<(Affine, Tensor, Tensor)> {
    let (w, b) = (weight.to_vec::<T>()?, bias.to_vec::<T>()?);
    let (rm, rv) = (rm.to_vec::<T>()?, rv.to_vec::<T>()?);
    let (mom, keep) = (T::of(cfg.momentum), T::of(1.0 - cfg.momentum));
    let c = stats.len();
    let mut out: [Vec<T>; 6] = Default::default();
    for (k, &(_, mean, m2)) in stats.iter().enumerate() {
        let (mean_t, var_t) = (T::of(mean), T::of(m2 / total));
        let s = (var_t + T::of(cfg.eps)).sqrt();
        let scale = w[k] / s;
        out[0].push(mean_t);
        out[1].push(T::of(1.0) / s);
        out[2].push(scale);
        out[3].push(b[k] - mean_t * scale);
        out[4].push(mom * mean_t + keep * rm[k]);
        out[5].push(mom * T::of(m2 / (total - 1.0)) + keep * rv[k]);
    }
    let invstd_host = out[1].iter().map(|v| v.f64()).collect();
    let [mean, _invstd, scale, shift, new_rm, new_rv] =
        out.map(|v| Tensor::from_vec(v, [c]).and_then(|t| t.to_device(dev)));
    Ok((
        Affine {
            mean: mean?,
            scale: scale?,
            invstd_host,
            shift: shift?,
        },
        new_rm?,
        new_rv?,
    ))
}

fn backward(
    group: &CommStream,
    gy: &Tensor,
    x: &Tensor,
    aff: &Affine,
    d: Dims,
    total: f64,
    needs: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    if gy.shape() != x.shape() {
        return Err(Error::shape(
            "sync_batch_norm_backward",
            format!("gy {} for input {}", gy.shape(), x.shape()),
        ));
    }
    same_device("sync_batch_norm_backward", &[x, gy])?;
    let (s1, s2) = local_grad_sums(x, gy, &aff.mean, d)?;
    let dev = x.device();
    let dtype = x.dtype();
    let vec_t = |v: Vec<f64>| -> Result<Tensor> {
        with_dtype!(dtype, T => {
            Tensor::from_vec(v.into_iter().map(T::of).collect::<Vec<T>>(), [d.c])?.to_device(dev)
        })
    };
    let inv = &aff.invstd_host;
    let empty = d.count() == 0;
    let gw = (needs[1] && !empty)
        .then(|| vec_t((0..d.c).map(|c| s2[c] * inv[c]).collect()))
        .transpose()?;
    let gb = (needs[2] && !empty)
        .then(|| vec_t(s1.clone()))
        .transpose()?;
    let gx = if needs[0] {
        let mut local = s1;
        local.extend(s2);
        let parts = gather_f64(group, local, "gradient-sum")?;
        let mut all = vec![0.0f64; 2 * d.c];
        for p in &parts {
            all.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        let k1 = vec_t((0..d.c).map(|c| all[c] / total).collect())?;
        let k2 = vec_t(
            (0..d.c)
                .map(|c| all[d.c + c] * inv[c] * inv[c] / total)
                .collect(),
        )?;
        Some(backward_x(x, gy, aff, &k1, &k2, d)?)
    } else {
        None
    };
    Ok(vec![gx, gw, gb])
}

// ---------------------------------------------------------------------------------
// Local sums: CPU loops in f64, or the batch-norm partial kernels (kernels/norm.cu)
// with the per-block partials merged on the host in f64.

/// Per channel: this rank's mean and M2 (0 and 0 when it has no values).
fn local_moments(x: &Tensor, d: Dims) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut mean = vec![0.0; d.c];
    let mut m2 = vec![0.0; d.c];
    if d.count() == 0 {
        return Ok((mean, m2));
    }
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let xs = x.cpu_slice::<T>()?;
            let m = d.count() as f64;
            for c in 0..d.c {
                // Two passes, as ops::norm's CPU moments: the mean, then the squared
                // deviations from it.
                let sum: f64 = planes(xs, d, c).flatten().map(|v| v.f64()).sum();
                mean[c] = sum / m;
                m2[c] = planes(xs, d, c).flatten().map(|v| (v.f64() - mean[c]).powi(2)).sum();
            }
        }),
        Device::Cuda(_) => {
            let partial = launch_partials(x, None, None, d, "batch_norm_stats_partial_f32", 3)?;
            let parts = partial.len() / (3 * d.c);
            for c in 0..d.c {
                let mut s = (0.0, 0.0, 0.0);
                for p in partial[c * parts * 3..(c + 1) * parts * 3].chunks_exact(3) {
                    merge(&mut s, p[0] as f64, p[1] as f64, p[2] as f64);
                }
                mean[c] = s.1;
                m2[c] = s.2;
            }
        }
    }
    Ok((mean, m2))
}

/// Per channel: this rank's `sum(gy)` and `sum(gy * (x - mean))`.
fn local_grad_sums(
    x: &Tensor,
    gy: &Tensor,
    mean: &Tensor,
    d: Dims,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut s1 = vec![0.0; d.c];
    let mut s2 = vec![0.0; d.c];
    if d.count() == 0 {
        return Ok((s1, s2));
    }
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let (xs, gs, mu) = (x.cpu_slice::<T>()?, gy.cpu_slice::<T>()?, mean.cpu_slice::<T>()?);
            for c in 0..d.c {
                let m = mu[c].f64();
                for (xv, g) in planes(xs, d, c).flatten().zip(planes(gs, d, c).flatten()) {
                    s1[c] += g.f64();
                    s2[c] += g.f64() * (xv.f64() - m);
                }
            }
        }),
        Device::Cuda(_) => {
            let partial =
                launch_partials(x, Some(gy), Some(mean), d, "batch_norm_grad_partial_f32", 2)?;
            let parts = partial.len() / (2 * d.c);
            for c in 0..d.c {
                for p in partial[c * parts * 2..(c + 1) * parts * 2].chunks_exact(2) {
                    s1[c] += p[0] as f64;
                    s2[c] += p[1] as f64;
                }
            }
        }
    }
    Ok((s1, s2))
}

/// The values of channel `c`, one plane per batch item.
fn planes<T>(x: &[T], d: Dims, c: usize) -> impl Iterator<Item = &[T]> {
    (0..d.n).map(move |n| &x[(n * d.c + c) * d.hw..(n * d.c + c + 1) * d.hw])
}

/// Run one of norm.cu's per-channel partial reductions (grid `(C, parts)`, args
/// followed by `N, C, hw, parts`) and read its `width` values per block back.
fn launch_partials(
    x: &Tensor,
    gy: Option<&Tensor>,
    mean: Option<&Tensor>,
    d: Dims,
    kernel: &str,
    width: usize,
) -> Result<Vec<f32>> {
    let dev = gpu_dev(OP, x)?;
    // As ops::norm: enough blocks to fill the GPU when C is small, at most 64.
    let parts = d.count().div_ceil(256 * 16).clamp(1, 64);
    let partial = Tensor::gpu_empty(&dev, [d.c * parts * width])?;
    let mut args = vec![arg(x)?];
    if let (Some(g), Some(m)) = (gy, mean) {
        args.push(arg(g)?);
        args.push(arg(m)?);
    }
    args.extend([
        arg(&partial)?,
        KernelArg::I64(d.n as i64),
        KernelArg::I32(d.c as i32),
        KernelArg::I64(d.hw as i64),
        KernelArg::I32(parts as i32),
    ]);
    let cfg = LaunchCfg {
        grid: (d.c as u32, parts as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(kernel, cfg, &args)?;
    partial.to_vec::<f32>()
}

/// `gx = scale * (gy - k1 - (x - mean) * k2)`.
fn backward_x(
    x: &Tensor,
    gy: &Tensor,
    aff: &Affine,
    k1: &Tensor,
    k2: &Tensor,
    d: Dims,
) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let (xs, gs) = (x.cpu_slice::<T>()?, gy.cpu_slice::<T>()?);
            let (mean, scale) = (aff.mean.cpu_slice::<T>()?, aff.scale.cpu_slice::<T>()?);
            let (k1, k2) = (k1.cpu_slice::<T>()?, k2.cpu_slice::<T>()?);
            let mut gx = vec![T::of(0.0); xs.len()];
            if d.hw > 0 {
                for (p, out) in gx.chunks_mut(d.hw).enumerate() {
                    let c = p % d.c;
                    let r = p * d.hw..(p + 1) * d.hw;
                    for ((o, &xv), &g) in out.iter_mut().zip(&xs[r.clone()]).zip(&gs[r]) {
                        *o = scale[c] * (g - k1[c] - (xv - mean[c]) * k2[c]);
                    }
                }
            }
            Tensor::from_vec(gx, x.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("sync_batch_norm_backward", x)?;
            let planes = d.n * d.c;
            if planes == 0 || d.hw == 0 {
                return Tensor::zeros(x.shape().clone(), x.dtype(), x.device());
            }
            let gx = Tensor::gpu_empty(&dev, x.shape().clone())?;
            let cfg = LaunchCfg {
                grid: (
                    d.hw.div_ceil(256 * 4).clamp(1, 128) as u32,
                    planes.min(65535) as u32,
                    1,
                ),
                block: (256, 1, 1),
                shared_bytes: 0,
            };
            dev.launch(
                "batch_norm_bwd_x_f32",
                cfg,
                &[
                    arg(x)?,
                    arg(gy)?,
                    arg(&aff.mean)?,
                    arg(&aff.scale)?,
                    arg(k1)?,
                    arg(k2)?,
                    arg(&gx)?,
                    KernelArg::I64(planes as i64),
                    KernelArg::I32(d.c as i32),
                    KernelArg::I64(d.hw as i64),
                ],
            )?;
            Ok(gx)
        }
    }
}
