//! MultiScaleRoIAlign: RoIAlign over FPN levels (P2..P5), each RoI on the level that
//! fits its size, with torchvision's semantics (`torchvision/ops/poolers.py`).
//!
//! - Level scales come from the feature sizes (`_infer_scale`): `2^round(log2(H_l / H))`
//!   with `H` the largest image height of the batch (f32 log2, round half to even).
//! - `k_min = -log2(scale of the first level)`, `k_max = -log2(scale of the last)`;
//!   the levels must be consecutive (P2, P3, P4, P5).
//! - A box's level (`LevelMapper`): `floor(lvl0 + log2(sqrt(area) / s0) + 1e-6)`,
//!   clamped to `[k_min, k_max]`, in the boxes' dtype; `lvl0 = 4`, `s0 = 224` by default.
//!   A box whose level is NaN (an inverted box: negative area) pools zeros, as in
//!   torchvision, where it matches no level.
//! - Each level is a [`roi_align`](crate::ops::roi_align) with that level's scale; the
//!   output rows follow the concatenated proposals of all images.
//!
//! On CUDA the whole pooler is one kernel launch (plus one small launch per image that
//! writes its RoIs with their batch index): each thread maps its RoI to a level on the
//! device and reads that level's map.

use crate::autograd::record;
use crate::device::gpu::{GpuBuffer, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::roi_align::{
    backward_levels, check_plane, forward_levels, i32_of, plan_roi, Level, RoiAlignParams, RoiPlan,
};
use crate::ops::{arg, gpu_dev};
use crate::tensor::{pool, same_device, DType, Element, Tensor};
use crate::with_dtype;

const OP: &str = "multiscale_roi_align";

/// torchvision's `LevelMapper` epsilon.
const LEVEL_EPS: f64 = 1e-6;

/// Most levels the CUDA kernel takes (P2..P5).
pub const MAX_CUDA_LEVELS: usize = 4;

/// MultiScaleRoIAlign settings (torchvision's `MultiScaleRoIAlign` and `LevelMapper`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiScaleRoIAlign {
    /// Output bins per RoI `(ph, pw)`; Faster R-CNN uses (7, 7).
    pub output_size: (usize, usize),
    /// Samples per bin per axis; 0 = adaptive. Faster R-CNN uses 2.
    pub sampling_ratio: usize,
    /// Box side (input pixels) that maps to `canonical_level`: 224.
    pub canonical_scale: f64,
    /// Level of a `canonical_scale`-sized box: 4.
    pub canonical_level: f64,
    /// Half-pixel shift of RoIAlign (false in torchvision's Faster R-CNN).
    pub aligned: bool,
}

/// Scales and level range of a batch of feature maps.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelSetup {
    /// Feature pixels per input pixel, per level (powers of two).
    pub scales: Vec<f64>,
    /// Level number of the first map (2 for P2).
    pub k_min: i64,
    /// Level number of the last map (5 for P5).
    pub k_max: i64,
}

/// torchvision's `_infer_scale` for a map of height `feature_h` over images at most
/// `image_h` high: `2^round(log2(feature_h / image_h))`, the log in f32 and the
/// rounding half to even. Only the height is used, as in torchvision.
pub fn infer_scale(feature_h: usize, image_h: usize) -> f64 {
    let approx = (feature_h as f64 / image_h as f64) as f32;
    2f64.powf(approx.log2().round_ties_even() as f64)
}

impl MultiScaleRoIAlign {
    /// torchvision's defaults (canonical scale 224 at level 4, not aligned).
    pub fn new(output_size: (usize, usize), sampling_ratio: usize) -> Self {
        MultiScaleRoIAlign {
            output_size,
            sampling_ratio,
            canonical_scale: 224.0,
            canonical_level: 4.0,
            aligned: false,
        }
    }

    /// Scales and `[k_min, k_max]` of `feature_heights` for `image_sizes` `(h, w)`
    /// (torchvision's `_setup_scales`). Errors when the levels are not consecutive.
    pub fn setup(feature_heights: &[usize], image_sizes: &[(usize, usize)]) -> Result<LevelSetup> {
        let max_h = image_sizes.iter().map(|s| s.0).max().unwrap_or(0);
        if max_h == 0 || feature_heights.is_empty() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} feature maps for image sizes {image_sizes:?}",
                    feature_heights.len()
                ),
            ));
        }
        let scales: Vec<f64> = feature_heights
            .iter()
            .map(|&h| infer_scale(h, max_h))
            .collect();
        // -log2 in f32 then int(): exact for the powers of two above.
        let level = |s: f64| (-(s as f32).log2()) as i64;
        let (k_min, k_max) = (level(scales[0]), level(scales[scales.len() - 1]));
        let consecutive = scales
            .iter()
            .enumerate()
            .all(|(i, &s)| level(s) == k_min + i as i64);
        if !consecutive {
            return Err(Error::invalid(
                OP,
                format!(
                    "feature heights {feature_heights:?} for images {image_sizes:?} give scales \
                     {scales:?}, not consecutive pyramid levels"
                ),
            ));
        }
        Ok(LevelSetup {
            scales,
            k_min,
            k_max,
        })
    }

    /// The level index (0 = first map) of box `[x1, y1, x2, y2]` (input pixels), or
    /// `None` when the mapper gives NaN (negative area, non-finite box).
    pub fn level_of<T: Element>(&self, b: [T; 4], k_min: i64, k_max: i64) -> Option<usize> {
        let area = (b[2] - b[0]) * (b[3] - b[1]);
        let s = area.sqrt();
        let lvl = (T::of(self.canonical_level)
            + (s / T::of(self.canonical_scale)).log2()
            + T::of(LEVEL_EPS))
        .floor();
        if lvl.is_nan() {
            return None;
        }
        let lvl = lvl.max(T::of(k_min as f64)).min(T::of(k_max as f64));
        // In [k_min, k_max]: exact.
        Some((lvl.to_i64().unwrap_or(k_min) - k_min) as usize)
    }

    fn params(&self, scale: f64) -> RoiAlignParams {
        RoiAlignParams {
            output_size: self.output_size,
            spatial_scale: scale,
            sampling_ratio: self.sampling_ratio,
            aligned: self.aligned,
        }
    }

    /// Pool `proposals` (one `[K_i, 4]` tensor of `(x1, y1, x2, y2)` per image, input
    /// pixels) from `features` (the pyramid, finest first, each `[N, C, H_l, W_l]`) for
    /// images of `image_sizes` `(h, w)` to `[sum K_i, C, ph, pw]`, rows in the order of
    /// the concatenated proposals.
    ///
    /// Records its backward (to every feature map) on the active tape. Errors when
    /// shapes, dtypes or devices disagree, `N`, `proposals.len()` and
    /// `image_sizes.len()` differ, the levels are not consecutive, or (CUDA) there are
    /// more than [`MAX_CUDA_LEVELS`] maps.
    pub fn forward(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let geo = self.check(features, proposals, image_sizes)?;
        let y = match geo.device {
            Device::Cpu => {
                with_dtype!(geo.dtype, T => self.forward_cpu::<T>(features, proposals, &geo))?
            }
            Device::Cuda(_) => self.forward_cuda(features, proposals, &geo)?,
        };
        self.record(features, proposals, image_sizes, &y);
        Ok(y)
    }

    fn record(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
        y: &Tensor,
    ) {
        let inputs: Vec<&Tensor> = features.iter().chain(proposals.iter()).collect();
        let this = *self;
        let (feats, props, sizes) = (features.to_vec(), proposals.to_vec(), image_sizes.to_vec());
        record(OP, &inputs, y, move |gy, needs| {
            let mut out: Vec<Option<Tensor>> = vec![None; feats.len() + props.len()];
            if needs[..feats.len()].iter().any(|&b| b) {
                let grads = this.backward(gy, &feats, &props, &sizes)?;
                for (i, g) in grads.into_iter().enumerate() {
                    out[i] = Some(g);
                }
            }
            Ok(out)
        });
    }

    /// dL/d(feature map) for every level (shaped like `features`) from dL/dy `gy`
    /// `[sum K_i, C, ph, pw]`, for the same inputs as [`MultiScaleRoIAlign::forward`]
    /// (only the shapes of `features` are read).
    pub fn backward(
        &self,
        gy: &Tensor,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Vec<Tensor>> {
        let geo = self.check(features, proposals, image_sizes)?;
        let (ph, pw) = self.output_size;
        let want = [geo.k, geo.c, ph, pw];
        if gy.dims() != want || gy.device() != geo.device || gy.dtype() != geo.dtype {
            return Err(Error::shape(
                "multiscale_roi_align_backward",
                format!(
                    "gy {} {} on {}, expected {want:?} {} on {}",
                    gy.shape(),
                    gy.dtype(),
                    gy.device(),
                    geo.dtype,
                    geo.device
                ),
            ));
        }
        match geo.device {
            Device::Cpu => with_dtype!(geo.dtype, T => self.backward_cpu::<T>(gy, proposals, &geo)),
            Device::Cuda(_) => self.backward_cuda(gy, proposals, &geo),
        }
    }

    fn check(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Geometry> {
        self.params(1.0).validate(OP)?;
        let canonical_ok = self.canonical_scale.is_finite()
            && self.canonical_scale > 0.0
            && self.canonical_level.is_finite();
        if !canonical_ok {
            return Err(Error::invalid(
                OP,
                format!(
                    "canonical scale {} / level {}",
                    self.canonical_scale, self.canonical_level
                ),
            ));
        }
        let Some(f0) = features.first() else {
            return Err(Error::invalid(OP, "no feature maps"));
        };
        let all: Vec<&Tensor> = features.iter().chain(proposals.iter()).collect();
        let device = same_device(OP, &all)?;
        let dtype = f0.dtype();
        let shapes = || {
            let f: Vec<String> = features.iter().map(|t| t.shape().to_string()).collect();
            let p: Vec<String> = proposals.iter().map(|t| t.shape().to_string()).collect();
            format!("features {f:?}, proposals {p:?}, image sizes {image_sizes:?}")
        };
        if dtype == DType::I64 || all.iter().any(|t| t.dtype() != dtype) {
            return Err(Error::DType {
                op: OP,
                dtype: dtype.to_string(),
                msg: format!(
                    "features and proposals must share one float dtype ({})",
                    shapes()
                ),
            });
        }
        let d0 = f0.dims();
        let ok_feat = features.iter().all(|t| {
            let d = t.dims();
            d.len() == 4 && d[0] == d0[0] && d[1] == d0[1] && d[2] > 0 && d[3] > 0
        });
        let ok_props = proposals
            .iter()
            .all(|t| t.dims().len() == 2 && t.dims()[1] == 4);
        if !ok_feat
            || !ok_props
            || proposals.len() != d0[0]
            || image_sizes.len() != d0[0]
            || image_sizes.iter().any(|&(h, w)| h == 0 || w == 0)
        {
            return Err(Error::shape(
                OP,
                format!(
                    "{}: expected maps [N, C, H_l, W_l] (non-empty), N proposal tensors [K_i, 4] \
                     and N image sizes",
                    shapes()
                ),
            ));
        }
        if device.is_cuda() && features.len() > MAX_CUDA_LEVELS {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} feature maps; the CUDA kernel takes at most {MAX_CUDA_LEVELS}",
                    features.len()
                ),
            ));
        }
        for t in features {
            let d = t.dims();
            check_plane(OP, [d[0], d[1], d[2], d[3]])?;
        }
        let heights: Vec<usize> = features.iter().map(|t| t.dims()[2]).collect();
        let setup = Self::setup(&heights, image_sizes)?;
        Ok(Geometry {
            device,
            dtype,
            n: d0[0],
            c: d0[1],
            k: proposals.iter().map(|t| t.dims()[0]).sum(),
            maps: features
                .iter()
                .map(|t| {
                    let d = t.dims();
                    [d[0], d[1], d[2], d[3]]
                })
                .collect(),
            setup,
        })
    }

    /// Runs `f` on the plans of the RoIs of each level, in output-row order. The
    /// per-level vectors are this thread's, kept (emptied) for the next call.
    fn with_plans<T: Element, R>(
        &self,
        proposals: &[Tensor],
        geo: &Geometry,
        f: impl FnOnce(&[Vec<RoiPlan<T>>]) -> Result<R>,
    ) -> Result<R> {
        pool::with_kept(|per_level: &mut Vec<Vec<RoiPlan<T>>>| {
            per_level.resize_with(geo.maps.len(), Vec::new);
            let r = self
                .plans_into(proposals, geo, per_level)
                .and_then(|()| f(per_level));
            per_level.iter_mut().for_each(Vec::clear);
            r
        })
    }

    fn plans_into<T: Element>(
        &self,
        proposals: &[Tensor],
        geo: &Geometry,
        per_level: &mut [Vec<RoiPlan<T>>],
    ) -> Result<()> {
        let mut row = 0;
        for (img, props) in proposals.iter().enumerate() {
            for b in props.cpu_slice::<T>()?.chunks_exact(4) {
                let b = [b[0], b[1], b[2], b[3]];
                if let Some(l) = self.level_of(b, geo.setup.k_min, geo.setup.k_max) {
                    let [_, _, h, w] = geo.maps[l];
                    let scale = geo.setup.scales[l];
                    if let Some(plan) =
                        plan_roi(row, img, b, T::of(scale), (h, w), self.params(scale))
                    {
                        per_level[l].push(plan);
                    }
                }
                row += 1;
            }
        }
        Ok(())
    }

    fn forward_cpu<T: Element>(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        geo: &Geometry,
    ) -> Result<Tensor> {
        self.with_plans::<T, _>(proposals, geo, |per_level| {
            let levels = features
                .iter()
                .zip(per_level)
                .zip(&geo.maps)
                .map(|((f, plans), &dims)| {
                    Ok(Level {
                        data: f.cpu_slice::<T>()?,
                        dims,
                        plans,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let y = forward_levels(&levels, geo.k, geo.c, self.output_size);
            let (ph, pw) = self.output_size;
            Tensor::from_vec(y, [geo.k, geo.c, ph, pw])
        })
    }

    fn backward_cpu<T: Element>(
        &self,
        gy: &Tensor,
        proposals: &[Tensor],
        geo: &Geometry,
    ) -> Result<Vec<Tensor>> {
        self.with_plans::<T, _>(proposals, geo, |per_level| {
            let levels: Vec<Level<'_, T>> = per_level
                .iter()
                .zip(&geo.maps)
                .map(|(plans, &dims)| Level {
                    data: &[],
                    dims,
                    plans,
                })
                .collect();
            let grads = backward_levels(&levels, gy.cpu_slice::<T>()?, geo.c, self.output_size);
            grads
                .into_iter()
                .zip(&geo.maps)
                .map(|(g, dims)| Tensor::from_vec(g, dims.to_vec()))
                .collect()
        })
    }

    /// The kernel arguments after the four map pointers: per-level sizes and scales
    /// (unused slots repeat the last level), the mapper, the RoIs and the output size.
    fn kernel_args(&self, geo: &Geometry, rois: &Tensor) -> Result<Vec<KernelArg>> {
        let last = geo.maps.len() - 1;
        let mut a = Vec::new();
        for axis in [2, 3] {
            for l in 0..MAX_CUDA_LEVELS {
                a.push(KernelArg::I32(i32_of(OP, geo.maps[l.min(last)][axis])?));
            }
        }
        for l in 0..MAX_CUDA_LEVELS {
            a.push(KernelArg::F32(geo.setup.scales[l.min(last)] as f32));
        }
        let (ph, pw) = self.output_size;
        a.extend([
            KernelArg::I32(geo.maps.len() as i32),
            KernelArg::I32(geo.setup.k_min as i32),
            KernelArg::F32(self.canonical_scale as f32),
            KernelArg::F32(self.canonical_level as f32),
            arg(rois)?,
            KernelArg::I64(geo.k as i64),
            KernelArg::I32(i32_of(OP, geo.n)?),
            KernelArg::I32(i32_of(OP, geo.c)?),
            KernelArg::I32(i32_of(OP, ph)?),
            KernelArg::I32(i32_of(OP, pw)?),
            KernelArg::I32(self.sampling_ratio as i32),
            KernelArg::I32(self.aligned as i32),
        ]);
        Ok(a)
    }

    /// `[K, 5]` device RoIs (batch index first) from the per-image proposals.
    fn pack_rois(&self, proposals: &[Tensor], geo: &Geometry) -> Result<Tensor> {
        let dev = gpu_dev(OP, &proposals[0])?;
        let rois = Tensor::gpu_empty(&dev, [geo.k, 5])?;
        let buf = &rois.gpu()?.buf;
        let mut row = 0usize;
        for (img, p) in proposals.iter().enumerate() {
            let n = p.dims()[0];
            if n > 0 {
                // A view of this image's rows; it keeps the whole buffer alive.
                let view = GpuBuffer::new(
                    buf.ptr() + (row * 5 * 4) as u64,
                    n * 5 * 4,
                    std::sync::Arc::new(buf.clone()),
                );
                dev.launch(
                    "roi_align_pack_rois_f32",
                    LaunchCfg::for_elems(n * 5),
                    &[
                        arg(p)?,
                        KernelArg::I64(n as i64),
                        KernelArg::F32(img as f32),
                        view.arg(),
                    ],
                )?;
            }
            row += n;
        }
        Ok(rois)
    }

    fn forward_cuda(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        geo: &Geometry,
    ) -> Result<Tensor> {
        let dev = gpu_dev(OP, &features[0])?;
        let (ph, pw) = self.output_size;
        let y = Tensor::gpu_empty(&dev, [geo.k, geo.c, ph, pw])?;
        let total = y.numel();
        if total == 0 {
            return Ok(y);
        }
        let rois = self.pack_rois(proposals, geo)?;
        let last = features.len() - 1;
        let mut args = (0..MAX_CUDA_LEVELS)
            .map(|l| arg(&features[l.min(last)]))
            .collect::<Result<Vec<_>>>()?;
        args.extend(self.kernel_args(geo, &rois)?);
        args.extend([arg(&y)?, KernelArg::I64(total as i64)]);
        dev.launch(
            "multiscale_roi_align_fwd_f32",
            LaunchCfg::for_elems(total),
            &args,
        )?;
        Ok(y)
    }

    fn backward_cuda(
        &self,
        gy: &Tensor,
        proposals: &[Tensor],
        geo: &Geometry,
    ) -> Result<Vec<Tensor>> {
        let dev = gpu_dev(OP, gy)?;
        let grads = geo
            .maps
            .iter()
            .map(|d| Tensor::gpu_zeros(&dev, d.to_vec()))
            .collect::<Result<Vec<_>>>()?;
        let total = gy.numel();
        if total == 0 {
            return Ok(grads);
        }
        let rois = self.pack_rois(proposals, geo)?;
        let last = grads.len() - 1;
        let mut args = vec![arg(gy)?];
        for l in 0..MAX_CUDA_LEVELS {
            args.push(arg(&grads[l.min(last)])?);
        }
        args.extend(self.kernel_args(geo, &rois)?);
        // One thread per gradient plane (level, image, channel), accumulating in a
        // fixed order: deterministic (kernels/roi_align.cu).
        let planes = grads.len() * geo.n * geo.c;
        args.push(KernelArg::I64(planes as i64));
        dev.launch(
            "multiscale_roi_align_bwd_f32",
            LaunchCfg::linear(planes, 64),
            &args,
        )?;
        Ok(grads)
    }
}

/// Checked sizes of one call.
struct Geometry {
    device: Device,
    dtype: DType,
    n: usize,
    c: usize,
    k: usize,
    maps: Vec<[usize; 4]>,
    setup: LevelSetup,
}
