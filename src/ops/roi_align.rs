//! RoIAlign (Mask R-CNN), forward and backward to the input, with torchvision's exact
//! semantics (`torchvision/csrc/ops/cpu/roi_align_kernel.cpp`).
//!
//! Each RoI `(batch, x1, y1, x2, y2)` (input-image pixels) is scaled by
//! `spatial_scale` into feature-map coordinates and cut into `ph x pw` bins; each bin
//! averages `grid_h x grid_w` bilinear samples at the centres of a regular sub-grid.
//!
//! Rules that are easy to get wrong, all torchvision's:
//! - `aligned` shifts the box by -0.5 feature pixel; without it a box narrower than one
//!   feature pixel is widened to 1 (never rounded).
//! - `sampling_ratio == 0` means `ceil(roi_size / bins)` samples per axis, per RoI.
//! - A sample with `y < -1` or `y > H` (likewise x) contributes 0 but still counts in the
//!   average; samples in `[-1, 0]` are clamped to 0; samples past `H - 1` read row `H - 1`.
//! - The batch index is truncated toward zero (`(int)rois[k][0]`).
//!
//! Rules of our own, for inputs torchvision leaves undefined:
//! - A RoI with a non-finite coordinate gives zeros and no gradient (torchvision's
//!   newer kernels agree for NaN; for infinities they would loop for ever).
//! - The adaptive grid is capped at [`MAX_GRID`] samples per axis per bin.
//! - A batch index outside `[0, N)` (or non-finite) is an error on the CPU; the CUDA
//!   kernels cannot report it without a host synchronisation, so there such a RoI gives
//!   zeros and no gradient, and never an out-of-bounds access.
//!
//! The CPU implementation shares the per-RoI sampling tables ([`RoiPlan`]) between all
//! channels, and runs one task per channel (forward) or per feature plane (backward), so
//! that the plane being read or accumulated stays in cache and no two threads write the
//! same memory. The backward accumulates in torchvision's order (RoI, bin, sample, tap),
//! so its sums are the same floating-point operations in the same order.

use rayon::prelude::*;

use crate::autograd::record;
use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Element, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev};

/// Most samples per axis per bin: the adaptive grid (`sampling_ratio == 0`) is capped
/// here, and a larger explicit `sampling_ratio` is an error. torchvision has no cap; any
/// RoI smaller than `MAX_GRID` feature pixels per bin gives its result.
pub const MAX_GRID: usize = 4096;

/// Settings of one RoIAlign (torchvision's `roi_align` arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiAlignParams {
    /// Output bins per RoI, `(ph, pw)`.
    pub output_size: (usize, usize),
    /// Feature-map pixels per input pixel (e.g. 0.25 for an FPN P2 map). Finite, > 0.
    pub spatial_scale: f64,
    /// Samples per bin along each axis; 0 = adaptive, `ceil(roi_size / bins)` per RoI.
    pub sampling_ratio: usize,
    /// Pixel-centre model: shift boxes by -0.5 feature pixel (detectron2's ROIAlignV2).
    pub aligned: bool,
}

impl RoiAlignParams {
    /// Params for `output_size` bins, `spatial_scale`, `sampling_ratio`, not aligned.
    pub fn new(output_size: (usize, usize), spatial_scale: f64, sampling_ratio: usize) -> Self {
        RoiAlignParams {
            output_size,
            spatial_scale,
            sampling_ratio,
            aligned: false,
        }
    }

    /// Error unless the output size is positive, the scale finite and positive and the
    /// sampling ratio at most [`MAX_GRID`].
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let (ph, pw) = self.output_size;
        if ph == 0 || pw == 0 {
            return Err(Error::invalid(
                op,
                format!("output_size ({ph}, {pw}) must be positive"),
            ));
        }
        if !(self.spatial_scale.is_finite() && self.spatial_scale > 0.0) {
            return Err(Error::invalid(
                op,
                format!(
                    "spatial_scale {} must be finite and > 0",
                    self.spatial_scale
                ),
            ));
        }
        if self.sampling_ratio > MAX_GRID {
            return Err(Error::invalid(
                op,
                format!("sampling_ratio {} exceeds {MAX_GRID}", self.sampling_ratio),
            ));
        }
        Ok(())
    }
}

/// RoIAlign of `input` `[N, C, H, W]` over `rois` `[K, 5]` (rows `(batch, x1, y1, x2,
/// y2)`, input-image pixels, same dtype and device as `input`) to `[K, C, ph, pw]`.
///
/// Records its backward (to `input`; `rois` gets no gradient) on the active tape.
/// Errors on bad ranks or shapes, mixed devices or dtypes, bad params, an empty feature
/// map with RoIs, and (CPU) a batch index outside `[0, N)`.
pub fn roi_align(input: &Tensor, rois: &Tensor, p: RoiAlignParams) -> Result<Tensor> {
    const OP: &str = "roi_align";
    let dims = check_inputs(OP, input, rois, p)?;
    let y = match input.device() {
        Device::Cpu => with_dtype!(input.dtype(), T => forward_cpu::<T>(input, rois, dims, p))?,
        Device::Cuda(_) => forward_cuda(input, rois, dims, p)?,
    };
    let rois_c = rois.clone();
    record(OP, &[input, rois], &y, move |gy, needs| {
        let gin = if needs[0] {
            Some(roi_align_backward(gy, &rois_c, dims, p)?)
        } else {
            None
        };
        Ok(vec![gin, None])
    });
    Ok(y)
}

/// dL/d(input) `[N, C, H, W]` (`input_dims`) of [`roi_align`] from dL/dy `gy`
/// `[K, C, ph, pw]` and the same `rois` and params.
pub fn roi_align_backward(
    gy: &Tensor,
    rois: &Tensor,
    input_dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Tensor> {
    const OP: &str = "roi_align_backward";
    p.validate(OP)?;
    let dev = same_device(OP, &[gy, rois])?;
    check_rois(OP, rois)?;
    let [_, c, h, w] = input_dims;
    let (ph, pw) = p.output_size;
    let k = rois.dims()[0];
    if gy.dims() != [k, c, ph, pw] {
        return Err(Error::shape(
            OP,
            format!(
                "gy {} for rois {} and input [{}, {c}, {h}, {w}] (expected [{k}, {c}, {ph}, {pw}])",
                gy.shape(),
                rois.shape(),
                input_dims[0]
            ),
        ));
    }
    if gy.dtype() != rois.dtype() {
        return Err(Error::DType {
            op: OP,
            dtype: rois.dtype().to_string(),
            msg: format!("rois with gy of {}", gy.dtype()),
        });
    }
    match dev {
        Device::Cpu => with_dtype!(gy.dtype(), T => backward_cpu::<T>(gy, rois, input_dims, p)),
        Device::Cuda(_) => backward_cuda(gy, rois, input_dims, p),
    }
}

fn check_rois(op: &'static str, rois: &Tensor) -> Result<()> {
    if rois.dims().len() != 2 || rois.dims()[1] != 5 {
        return Err(Error::shape(
            op,
            format!(
                "rois {} must be [K, 5] (batch, x1, y1, x2, y2)",
                rois.shape()
            ),
        ));
    }
    Ok(())
}

fn check_inputs(
    op: &'static str,
    input: &Tensor,
    rois: &Tensor,
    p: RoiAlignParams,
) -> Result<[usize; 4]> {
    p.validate(op)?;
    same_device(op, &[input, rois])?;
    if input.dims().len() != 4 {
        return Err(Error::shape(
            op,
            format!("input {} must be [N, C, H, W]", input.shape()),
        ));
    }
    check_rois(op, rois)?;
    if input.dtype() != rois.dtype() || input.dtype() == DType::I64 {
        return Err(Error::DType {
            op,
            dtype: rois.dtype().to_string(),
            msg: format!("rois with input of {} (both f32 or f64)", input.dtype()),
        });
    }
    let d = input.dims();
    let dims = [d[0], d[1], d[2], d[3]];
    if rois.dims()[0] > 0 && (dims[2] == 0 || dims[3] == 0) {
        return Err(Error::shape(
            op,
            format!("input {} has an empty feature map", input.shape()),
        ));
    }
    Ok(dims)
}

// ---------------------------------------------------------------------------------
// CPU: sampling tables shared by all channels
// ---------------------------------------------------------------------------------

/// One bilinear sample position along one axis: the two neighbouring pixels (as
/// element offsets in the plane: `row * W` for y, `col` for x) and their weights
/// `h = 1 - l` (for `lo`) and `l` (for `hi`). `ok` is false outside `[-1, size]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AxisSample<T> {
    lo: usize,
    hi: usize,
    l: T,
    h: T,
    ok: bool,
}

/// How one RoI samples its feature plane, shared by every channel: `ph * grid_h`
/// y-samples and `pw * grid_w` x-samples (bin-major), separable because torchvision's
/// bounds test and weights (`w1 = hy * hx`, ...) factor per axis.
#[derive(Clone, Debug)]
pub(crate) struct RoiPlan<T> {
    /// Image of the RoI (index into the feature maps' N).
    pub batch: usize,
    /// Output row: the RoI's index in `rois`.
    pub row: usize,
    grid_h: usize,
    grid_w: usize,
    count: T,
    ys: Vec<AxisSample<T>>,
    xs: Vec<AxisSample<T>>,
}

/// A feature map `[N, C, H, W]` and the plans of the RoIs pooled from it, in
/// ascending output row.
pub(crate) struct Level<'a, T> {
    pub data: &'a [T],
    pub dims: [usize; 4],
    pub plans: Vec<RoiPlan<T>>,
}

/// torchvision's `bilinear_interpolate` along one axis of length `size` (elements
/// `stride` apart), including its clamps; `1. - l` is computed in double as in C++.
fn axis_sample<T: Element>(coord: T, size: usize, stride: usize) -> AxisSample<T> {
    let n = T::of(size as f64);
    if !(coord >= T::of(-1.0) && coord <= n) {
        return AxisSample {
            lo: 0,
            hi: 0,
            l: T::zero(),
            h: T::zero(),
            ok: false,
        };
    }
    let mut c = if coord <= T::zero() { T::zero() } else { coord };
    // c is in [0, size]: the truncation is exact and in range.
    let mut lo = c.to_usize().unwrap_or(0);
    let hi;
    if lo >= size - 1 {
        lo = size - 1;
        hi = lo;
        c = T::of(lo as f64);
    } else {
        hi = lo + 1;
    }
    let l = c - T::of(lo as f64);
    AxisSample {
        lo: lo * stride,
        hi: hi * stride,
        l,
        h: T::of(1.0 - l.f64()),
        ok: true,
    }
}

/// Samples per axis for one RoI side: the explicit ratio, or torchvision's adaptive
/// `ceil(roi_size / bins)` (0 when that is not positive, capped at [`MAX_GRID`]).
fn grid_size<T: Element>(ratio: usize, roi_size: T, bins: usize) -> usize {
    if ratio > 0 {
        return ratio;
    }
    let g = (roi_size / T::of(bins as f64)).ceil();
    if g >= T::of(MAX_GRID as f64) {
        MAX_GRID
    } else if g > T::zero() {
        g.to_usize().unwrap_or(0)
    } else {
        0 // also NaN
    }
}

/// The plan of RoI `row` with box `b = [x1, y1, x2, y2]` (input pixels) on a map of
/// `h x w` at `scale`; `None` when a coordinate is not finite (the RoI gives zeros).
pub(crate) fn plan_roi<T: Element>(
    row: usize,
    batch: usize,
    b: [T; 4],
    scale: T,
    hw: (usize, usize),
    p: RoiAlignParams,
) -> Option<RoiPlan<T>> {
    let offset = if p.aligned { T::of(0.5) } else { T::zero() };
    let start_w = b[0] * scale - offset;
    let start_h = b[1] * scale - offset;
    let end_w = b[2] * scale - offset;
    let end_h = b[3] * scale - offset;
    if ![start_w, start_h, end_w, end_h]
        .iter()
        .all(|v| v.is_finite())
    {
        return None;
    }
    let mut roi_w = end_w - start_w;
    let mut roi_h = end_h - start_h;
    if !p.aligned {
        // Force malformed RoIs to be 1x1 (torchvision's std::max, NaN excluded above).
        roi_w = roi_w.max(T::one());
        roi_h = roi_h.max(T::one());
    }
    let (ph, pw) = p.output_size;
    let bin_h = roi_h / T::of(ph as f64);
    let bin_w = roi_w / T::of(pw as f64);
    let grid_h = grid_size(p.sampling_ratio, roi_h, ph);
    let grid_w = grid_size(p.sampling_ratio, roi_w, pw);
    let count = T::of((grid_h * grid_w).max(1) as f64);
    let axis = |start: T, bin: T, bins: usize, grid: usize, size: usize, stride: usize| {
        let mut v = Vec::with_capacity(bins * grid);
        for pi in 0..bins {
            for i in 0..grid {
                // Same operations, same order as torchvision: start + p*bin + (i+.5)*bin/grid.
                let c = start
                    + T::of(pi as f64) * bin
                    + T::of(i as f64 + 0.5) * bin / T::of(grid as f64);
                v.push(axis_sample(c, size, stride));
            }
        }
        v
    };
    Some(RoiPlan {
        batch,
        row,
        grid_h,
        grid_w,
        count,
        ys: axis(start_h, bin_h, ph, grid_h, hw.0, hw.1),
        xs: axis(start_w, bin_w, pw, grid_w, hw.1, 1),
    })
}

/// The image of RoI `k` (`(int)rois[k][0]`); an error unless in `[0, n)`.
pub(crate) fn batch_index<T: Element>(op: &'static str, v: T, k: usize, n: usize) -> Result<usize> {
    let t = v.trunc();
    if t.is_finite() && t >= T::zero() && t < T::of(n as f64) {
        // In [0, n): exact.
        Ok(t.to_usize().unwrap_or(0))
    } else {
        Err(Error::invalid(
            op,
            format!("rois[{k}] has batch index {v}, outside [0, {n})"),
        ))
    }
}

/// Plans for every RoI of `rois` `[K, 5]` on one map (in row order; non-finite boxes
/// have no plan).
fn plan_all<T: Element>(
    op: &'static str,
    rois: &[T],
    dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Vec<RoiPlan<T>>> {
    let scale = T::of(p.spatial_scale);
    let plans: Vec<Option<RoiPlan<T>>> = rois
        .par_chunks(5)
        .enumerate()
        .map(|(k, r)| {
            let b = batch_index(op, r[0], k, dims[0])?;
            Ok(plan_roi(
                k,
                b,
                [r[1], r[2], r[3], r[4]],
                scale,
                (dims[2], dims[3]),
                p,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(plans.into_iter().flatten().collect())
}

/// One bin of one channel: torchvision's sum over samples, then `/ count`.
#[inline]
fn pool_bin<T: Element>(plane: &[T], plan: &RoiPlan<T>, ph_i: usize, pw_i: usize) -> T {
    let mut acc = T::zero();
    let ys = &plan.ys[ph_i * plan.grid_h..(ph_i + 1) * plan.grid_h];
    let xs = &plan.xs[pw_i * plan.grid_w..(pw_i + 1) * plan.grid_w];
    for y in ys {
        for x in xs {
            if y.ok && x.ok {
                let (w1, w2, w3, w4) = (y.h * x.h, y.h * x.l, y.l * x.h, y.l * x.l);
                acc += w1 * plane[y.lo + x.lo]
                    + w2 * plane[y.lo + x.hi]
                    + w3 * plane[y.hi + x.lo]
                    + w4 * plane[y.hi + x.hi];
            } else {
                // torchvision's empty sample: weight 0 on element 0 (NaN there propagates).
                let z = T::zero() * plane[0];
                acc += z + z + z + z;
            }
        }
    }
    acc / plan.count
}

/// Pool every level's RoIs into `[K, C, ph, pw]` (rows without a plan stay zero).
///
/// One task per channel writes a channel-major `[C, K, ph*pw]` buffer, reading only
/// that channel's planes (which stay in cache across all RoIs); a parallel transpose
/// gives the output layout.
pub(crate) fn forward_levels<T: Element>(
    levels: &[Level<'_, T>],
    k: usize,
    c: usize,
    output_size: (usize, usize),
) -> Vec<T> {
    let (ph, pw) = output_size;
    let bins = ph * pw;
    let mut by_channel = vec![T::zero(); c * k * bins];
    if by_channel.is_empty() {
        return by_channel;
    }
    by_channel
        .par_chunks_mut(k * bins)
        .enumerate()
        .for_each(|(ci, out)| {
            for lvl in levels {
                let [_, _, h, w] = lvl.dims;
                for plan in &lvl.plans {
                    let plane = &lvl.data[(plan.batch * c + ci) * h * w..][..h * w];
                    let o = &mut out[plan.row * bins..][..bins];
                    for ph_i in 0..ph {
                        for pw_i in 0..pw {
                            o[ph_i * pw + pw_i] = pool_bin(plane, plan, ph_i, pw_i);
                        }
                    }
                }
            }
        });
    let mut y = vec![T::zero(); k * c * bins];
    y.par_chunks_mut(c * bins)
        .enumerate()
        .for_each(|(ki, row)| {
            for (ci, dst) in row.chunks_mut(bins).enumerate() {
                dst.copy_from_slice(&by_channel[(ci * k + ki) * bins..][..bins]);
            }
        });
    y
}

/// Scatter one RoI's upstream gradient `gy_rc` (`[ph, pw]`, one channel) into `plane`,
/// exactly as torchvision's backward does (`g * w / count`, taps 1..4 in order).
#[inline]
fn scatter_roi<T: Element>(plane: &mut [T], plan: &RoiPlan<T>, gy_rc: &[T], pw: usize) {
    for (b, &g) in gy_rc.iter().enumerate() {
        let (ph_i, pw_i) = (b / pw, b % pw);
        let ys = &plan.ys[ph_i * plan.grid_h..(ph_i + 1) * plan.grid_h];
        let xs = &plan.xs[pw_i * plan.grid_w..(pw_i + 1) * plan.grid_w];
        for y in ys.iter().filter(|y| y.ok) {
            for x in xs.iter().filter(|x| x.ok) {
                plane[y.lo + x.lo] += g * (y.h * x.h) / plan.count;
                plane[y.lo + x.hi] += g * (y.h * x.l) / plan.count;
                plane[y.hi + x.lo] += g * (y.l * x.h) / plan.count;
                plane[y.hi + x.hi] += g * (y.l * x.l) / plan.count;
            }
        }
    }
}

/// dL/d(level maps) from dL/dy `[K, C, ph, pw]`: one zero-initialised `[N, C, H, W]`
/// buffer per level. One task per feature plane, visiting that image's RoIs in row
/// order, so every plane has one writer and torchvision's summation order.
pub(crate) fn backward_levels<T: Element>(
    levels: &[Level<'_, T>],
    gy: &[T],
    c: usize,
    output_size: (usize, usize),
) -> Vec<Vec<T>> {
    let (ph, pw) = output_size;
    let bins = ph * pw;
    let mut grads: Vec<Vec<T>> = levels
        .iter()
        .map(|l| vec![T::zero(); l.dims.iter().product()])
        .collect();
    // Per level and image, the plans in row order.
    let by_image: Vec<Vec<Vec<&RoiPlan<T>>>> = levels
        .iter()
        .map(|l| {
            let mut v = vec![Vec::new(); l.dims[0]];
            for plan in &l.plans {
                v[plan.batch].push(plan);
            }
            v
        })
        .collect();
    let mut tasks: Vec<(usize, usize, &mut [T])> = Vec::new();
    for (li, g) in grads.iter_mut().enumerate() {
        let [_, _, h, w] = levels[li].dims;
        if h * w == 0 {
            continue;
        }
        tasks.extend(g.chunks_mut(h * w).enumerate().map(|(pi, pl)| (li, pi, pl)));
    }
    tasks.into_par_iter().for_each(|(li, pi, plane)| {
        let (b, ci) = (pi / c, pi % c);
        for plan in &by_image[li][b] {
            let gy_rc = &gy[(plan.row * c + ci) * bins..][..bins];
            scatter_roi(plane, plan, gy_rc, pw);
        }
    });
    grads
}

fn forward_cpu<T: Element>(
    input: &Tensor,
    rois: &Tensor,
    dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Tensor> {
    let (ph, pw) = p.output_size;
    let k = rois.dims()[0];
    let level = Level {
        data: input.cpu_slice::<T>()?,
        dims,
        plans: plan_all("roi_align", rois.cpu_slice::<T>()?, dims, p)?,
    };
    let y = forward_levels(&[level], k, dims[1], p.output_size);
    Tensor::from_vec(y, [k, dims[1], ph, pw])
}

fn backward_cpu<T: Element>(
    gy: &Tensor,
    rois: &Tensor,
    dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Tensor> {
    let plans = if rois.dims()[0] > 0 && dims[2] * dims[3] > 0 {
        plan_all("roi_align_backward", rois.cpu_slice::<T>()?, dims, p)?
    } else {
        Vec::new()
    };
    let level = Level {
        data: &[],
        dims,
        plans,
    };
    let mut g = backward_levels(&[level], gy.cpu_slice::<T>()?, dims[1], p.output_size);
    Tensor::from_vec(g.pop().unwrap_or_default(), dims.to_vec())
}

// ---------------------------------------------------------------------------------
// CUDA launchers (kernels/roi_align.cu)
// ---------------------------------------------------------------------------------

/// The kernel arguments shared by the forward and backward single-map kernels, after
/// the leading data pointer.
fn common_args(rois: &Tensor, dims: [usize; 4], p: RoiAlignParams) -> Result<Vec<KernelArg>> {
    let (ph, pw) = p.output_size;
    let [n, c, h, w] = dims;
    Ok(vec![
        arg(rois)?,
        KernelArg::I64(rois.dims()[0] as i64),
        KernelArg::I32(i32_of("roi_align", n)?),
        KernelArg::I32(i32_of("roi_align", c)?),
        KernelArg::I32(i32_of("roi_align", h)?),
        KernelArg::I32(i32_of("roi_align", w)?),
        KernelArg::I32(i32_of("roi_align", ph)?),
        KernelArg::I32(i32_of("roi_align", pw)?),
        KernelArg::F32(p.spatial_scale as f32),
        KernelArg::I32(p.sampling_ratio as i32),
        KernelArg::I32(p.aligned as i32),
    ])
}

/// A size as a kernel `int`; an error past `i32::MAX`.
pub(crate) fn i32_of(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(op, format!("size {v} exceeds the CUDA kernels' int range")))
}

fn forward_cuda(
    input: &Tensor,
    rois: &Tensor,
    dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Tensor> {
    let dev = gpu_dev("roi_align", input)?;
    let (ph, pw) = p.output_size;
    let k = rois.dims()[0];
    let y = Tensor::gpu_zeros(&dev, [k, dims[1], ph, pw])?;
    let n = y.numel();
    if n == 0 {
        return Ok(y);
    }
    let mut args = vec![arg(input)?];
    args.extend(common_args(rois, dims, p)?);
    args.push(arg(&y)?);
    args.push(KernelArg::I64(n as i64));
    dev.launch("roi_align_fwd_f32", LaunchCfg::for_elems(n), &args)?;
    Ok(y)
}

fn backward_cuda(
    gy: &Tensor,
    rois: &Tensor,
    dims: [usize; 4],
    p: RoiAlignParams,
) -> Result<Tensor> {
    let dev = gpu_dev("roi_align_backward", gy)?;
    let gin = Tensor::gpu_zeros(&dev, dims.to_vec())?;
    let n = gy.numel();
    if n == 0 || gin.numel() == 0 {
        return Ok(gin);
    }
    let mut args = vec![arg(gy)?];
    args.extend(common_args(rois, dims, p)?);
    args.push(arg(&gin)?);
    args.push(KernelArg::I64(n as i64));
    dev.launch("roi_align_bwd_f32", LaunchCfg::for_elems(n), &args)?;
    Ok(gin)
}
