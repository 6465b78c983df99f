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
//! The CPU implementation computes each RoI's sampling tables once and shares them
//! between all channels. The forward runs one task per block of channels and the
//! backward one task per block of feature planes, so that the planes being read or
//! accumulated stay in cache and no two threads write the same memory. Both do
//! torchvision's floating-point operations in torchvision's order (the backward
//! accumulates per RoI, bin, sample and tap), so f32 results match its CPU kernel bit
//! for bit. The CUDA backward scatters with atomicAdd, as torchvision's does.

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
    check_plane(OP, input_dims)?;
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
    check_plane(op, dims)?;
    Ok(dims)
}

/// Error unless an `[H, W]` plane has fewer than 2^32 elements (the sampling tables
/// hold u32 offsets).
pub(crate) fn check_plane(op: &'static str, dims: [usize; 4]) -> Result<()> {
    if dims[2].saturating_mul(dims[3]) > u32::MAX as usize {
        return Err(Error::shape(
            op,
            format!(
                "feature plane {}x{} exceeds 2^32 elements",
                dims[2], dims[3]
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// CPU: sampling tables shared by all channels
// ---------------------------------------------------------------------------------

/// One bilinear sample position along one axis: the two neighbouring pixels (as
/// element offsets in the plane: `row * W` for y, `col` for x) and their weights
/// `h = 1 - l` (for `lo`) and `l` (for `hi`). `ok` is false outside `[-1, size]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AxisSample<T> {
    lo: u32,
    hi: u32,
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
    /// `1 / count` when `count` is a power of two (then `v * inv == v / count` exactly).
    inv_count: Option<T>,
    ys: Vec<AxisSample<T>>,
    xs: Vec<AxisSample<T>>,
}

/// A feature map `[N, C, H, W]` and the plans of the RoIs pooled from it, in
/// ascending output row.
pub(crate) struct Level<'a, T> {
    pub data: &'a [T],
    pub dims: [usize; 4],
    pub plans: &'a [RoiPlan<T>],
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
    // Offsets fit u32: planes are checked to hold fewer than 2^32 elements.
    AxisSample {
        lo: (lo * stride) as u32,
        hi: (hi * stride) as u32,
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
    let samples = (grid_h * grid_w).max(1);
    let count = T::of(samples as f64);
    let inv_count = samples.is_power_of_two().then(|| T::one() / count);
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
        inv_count,
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

/// Channels pooled together in the forward: a sample's weights and offsets are
/// computed once for the block, and the block's planes (4 x 243 KB for an
/// 800x1216 image's P2) stay in the 1-2 MB of L2 cache per core. (The backward
/// scatters [`SCATTER_BLOCK`] channels at a time, channel-last.)
const CHANNEL_BLOCK: usize = 4;

/// The bin and sample tables of bin `b` (row-major in `[ph, pw]`) of `plan`.
#[inline]
fn bin_samples<T>(plan: &RoiPlan<T>, b: usize, pw: usize) -> (&[AxisSample<T>], &[AxisSample<T>]) {
    let (ph_i, pw_i) = (b / pw, b % pw);
    (
        &plan.ys[ph_i * plan.grid_h..(ph_i + 1) * plan.grid_h],
        &plan.xs[pw_i * plan.grid_w..(pw_i + 1) * plan.grid_w],
    )
}

/// Bin `b` of `B` channels (`planes`, each `[H * W]`): per channel, torchvision's sum
/// over the bin's samples (same operations, same order), then `/ count`.
#[inline]
fn pool_bin<T: Element, const B: usize>(
    planes: &[&[T]; B],
    plan: &RoiPlan<T>,
    b: usize,
    pw: usize,
) -> [T; B] {
    let mut acc = [T::zero(); B];
    let (ys, xs) = bin_samples(plan, b, pw);
    for y in ys {
        for x in xs {
            if y.ok && x.ok {
                let (w1, w2, w3, w4) = (y.h * x.h, y.h * x.l, y.l * x.h, y.l * x.l);
                let (ylo, yhi) = (y.lo as usize, y.hi as usize);
                let (i1, i2) = (ylo + x.lo as usize, ylo + x.hi as usize);
                let (i3, i4) = (yhi + x.lo as usize, yhi + x.hi as usize);
                for (a, p) in acc.iter_mut().zip(planes) {
                    *a += w1 * p[i1] + w2 * p[i2] + w3 * p[i3] + w4 * p[i4];
                }
            } else {
                // torchvision's empty sample: weight 0 on element 0 (NaN there propagates).
                for (a, p) in acc.iter_mut().zip(planes) {
                    let z = T::zero() * p[0];
                    *a += z + z + z + z;
                }
            }
        }
    }
    acc.map(|a| a / plan.count)
}

/// Pool channels `c0..c0 + B` of every level's RoIs into `outs[j][row]` (`[ph * pw]`).
fn pool_channels<T: Element, const B: usize>(
    levels: &[Level<'_, T>],
    c: usize,
    c0: usize,
    outs: &mut [Vec<&mut [T]>],
    pw: usize,
) {
    for lvl in levels {
        let hw = lvl.dims[2] * lvl.dims[3];
        for plan in lvl.plans {
            let base = (plan.batch * c + c0) * hw;
            let planes: [&[T]; B] = std::array::from_fn(|j| &lvl.data[base + j * hw..][..hw]);
            let bins = outs[0][plan.row].len();
            for b in 0..bins {
                let v = pool_bin(&planes, plan, b, pw);
                for (out, v) in outs.iter_mut().zip(v) {
                    out[plan.row][b] = v;
                }
            }
        }
    }
}

/// Pool every level's RoIs into `[K, C, ph, pw]` (rows without a plan stay zero).
///
/// One task per block of channels, reading only those channels' planes (which stay in
/// cache across all RoIs) and writing their `[ph, pw]` blocks of every output row: the
/// output is split into per-(RoI, channel) blocks, regrouped by channel, so each task
/// owns what it writes.
pub(crate) fn forward_levels<T: Element>(
    levels: &[Level<'_, T>],
    k: usize,
    c: usize,
    output_size: (usize, usize),
) -> Vec<T> {
    let (ph, pw) = output_size;
    let bins = ph * pw;
    let mut y = crate::tensor::pool::take_zeroed::<T>(k * c * bins);
    if y.is_empty() {
        return y;
    }
    let mut by_channel: Vec<Vec<&mut [T]>> = (0..c).map(|_| Vec::with_capacity(k)).collect();
    for row in y.chunks_mut(c * bins) {
        for (blocks, block) in by_channel.iter_mut().zip(row.chunks_mut(bins)) {
            blocks.push(block);
        }
    }
    by_channel
        .par_chunks_mut(CHANNEL_BLOCK)
        .enumerate()
        .for_each(|(blk, outs)| {
            let c0 = blk * CHANNEL_BLOCK;
            if outs.len() == CHANNEL_BLOCK {
                pool_channels::<T, CHANNEL_BLOCK>(levels, c, c0, outs, pw);
            } else {
                for j in 0..outs.len() {
                    pool_channels::<T, 1>(levels, c, c0 + j, &mut outs[j..j + 1], pw);
                }
            }
        });
    y
}

/// Channels scattered together in the backward, accumulated channel-last (see
/// [`scatter_channels_last`]).
const SCATTER_BLOCK: usize = 8;

/// Scatter dL/dy of one RoI (channels `c0..c0 + B`, `gy_rows`) as torchvision's
/// backward does: per element, `g * w / count` for taps 1..4 of each sample in bin
/// order (`avg` is the division by `count`), into a channel-last scratch
/// `acc[pixel][j]`: a tap's `B` channels are one contiguous run (one vector
/// operation) instead of `B` scalar read-modify-writes in `B` planes. Each element
/// gets the same additions in the same order (RoIs, bins, samples, taps) for any `B`.
fn scatter_roi_last<T: Element, const B: usize>(
    acc: &mut [[T; B]],
    plan: &RoiPlan<T>,
    gy_rows: [&[T]; B],
    (bins, pw): (usize, usize),
    avg: impl Fn(T) -> T,
) {
    for b in 0..bins {
        let g: [T; B] = gy_rows.map(|row| row[b]);
        let (ys, xs) = bin_samples(plan, b, pw);
        for y in ys.iter().filter(|y| y.ok) {
            let (ylo, yhi) = (y.lo as usize, y.hi as usize);
            for x in xs.iter().filter(|x| x.ok) {
                let w = [y.h * x.h, y.h * x.l, y.l * x.h, y.l * x.l];
                let taps = [
                    ylo + x.lo as usize,
                    ylo + x.hi as usize,
                    yhi + x.lo as usize,
                    yhi + x.hi as usize,
                ];
                for (&i, &w) in taps.iter().zip(&w) {
                    let a = &mut acc[i];
                    for (a, &g) in a.iter_mut().zip(&g) {
                        *a += avg(g * w);
                    }
                }
            }
        }
    }
}

/// Scatter channels `c0..c0 + B` of every RoI in `plans` (one image, row order)
/// through a channel-last scratch, written into the block's (zero) planes at the
/// end.
fn scatter_channels_last<T: Element, const B: usize>(
    planes: &mut [&mut [T]; B],
    plans: &[&RoiPlan<T>],
    gy: &[T],
    c: usize,
    c0: usize,
    bins: usize,
    pw: usize,
) {
    let hw = planes[0].len();
    // The scratch is this thread's, kept for the next task.
    crate::tensor::pool::with_vec::<[T; B], _>(hw, |acc| {
        acc.resize(hw, [T::zero(); B]);
        for plan in plans {
            let rows: [&[T]; B] =
                std::array::from_fn(|j| &gy[(plan.row * c + c0 + j) * bins..][..bins]);
            match plan.inv_count {
                Some(r) => scatter_roi_last(acc, plan, rows, (bins, pw), |v| v * r),
                None => scatter_roi_last(acc, plan, rows, (bins, pw), |v| v / plan.count),
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (p, &v) in planes.iter_mut().zip(a) {
                p[i] = v;
            }
        }
    })
}

/// dL/d(level maps) from dL/dy `[K, C, ph, pw]`: one `[N, C, H, W]` buffer per level
/// (from the host pool: each plane's task writes all of it, zeros included). One task
/// per block of planes of one image, visiting that image's RoIs in row order: every
/// plane has one writer and torchvision's summation order.
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
        .map(|l| crate::tensor::pool::take(l.dims.iter().product()))
        .collect();
    // Per level and image, the plans in row order.
    let by_image: Vec<Vec<Vec<&RoiPlan<T>>>> = levels
        .iter()
        .map(|l| {
            let mut v = vec![Vec::new(); l.dims[0]];
            for plan in l.plans {
                v[plan.batch].push(plan);
            }
            v
        })
        .collect();
    // (level, image, first channel, planes)
    let mut tasks: Vec<(usize, usize, usize, Vec<&mut [T]>)> = Vec::new();
    for (li, g) in grads.iter_mut().enumerate() {
        let hw = levels[li].dims[2] * levels[li].dims[3];
        if hw * c == 0 {
            continue;
        }
        for (b, image) in g.chunks_mut(c * hw).enumerate() {
            for (blk, chunk) in image.chunks_mut(SCATTER_BLOCK * hw).enumerate() {
                tasks.push((li, b, blk * SCATTER_BLOCK, chunk.chunks_mut(hw).collect()));
            }
        }
    }
    tasks.into_par_iter().for_each(|(li, b, c0, planes)| {
        let plans = &by_image[li][b];
        match <[&mut [T]; SCATTER_BLOCK]>::try_from(planes) {
            Ok(mut block) => scatter_channels_last(&mut block, plans, gy, c, c0, bins, pw),
            Err(rest) => {
                for (j, plane) in rest.into_iter().enumerate() {
                    scatter_channels_last(&mut [plane], plans, gy, c, c0 + j, bins, pw);
                }
            }
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
    let plans = plan_all("roi_align", rois.cpu_slice::<T>()?, dims, p)?;
    let level = Level {
        data: input.cpu_slice::<T>()?,
        dims,
        plans: &plans,
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
        plans: &plans,
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
    let y = Tensor::gpu_empty(&dev, [k, dims[1], ph, pw])?;
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
    // One thread per gradient plane, accumulating in a fixed order: deterministic.
    let planes = dims[0] * dims[1];
    args.push(KernelArg::I64(planes as i64));
    dev.launch("roi_align_bwd_f32", LaunchCfg::linear(planes, 64), &args)?;
    Ok(gin)
}
