//! Box coding: regression targets of boxes relative to reference boxes, and back.
//!
//! torchvision's `BoxCoder` (detection/_utils.py) step by step in the input's float
//! type: widths `x2 - x1` (no "+1"), centres `x1 + 0.5 * w`, targets
//! `(wx * (gx - ex) / ew, wy * (gy - ey) / eh, ww * ln(gw / ew), wh * ln(gh / eh))`;
//! decoding divides by the weights, clamps `dw`, `dh` above at `bbox_xform_clip`
//! (default `ln(1000 / 16)`), and returns `ctr -/+ 0.5 * size`. The CUDA kernels
//! (kernels/box_coder.cu) use the same operations without FMA contraction; `exp`
//! and `ln` may differ from the CPU's in the last bit.
//!
//! Degenerate inputs follow the formulas: a reference box of zero width encodes to
//! ±inf or NaN, NaN coordinates or codes give NaN, a NaN `dw` is not clamped.
//! Not differentiable: detection encodes targets and decodes detached predictions.

use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::boxes::check_boxes;
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{same_device, Element, Tensor};
use crate::with_dtype;
use num_traits::Zero;

/// torchvision's default clamp of `dw`, `dh` before `exp`: `ln(1000 / 16)`.
pub fn default_bbox_xform_clip() -> f64 {
    (1000.0f64 / 16.0).ln()
}

/// Encodes and decodes boxes with weights `(wx, wy, ww, wh)`: `(1, 1, 1, 1)` for the
/// RPN, `(10, 10, 5, 5)` for the box head.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxCoder {
    /// Weights (wx, wy, ww, wh) of the encoding.
    pub weights: [f64; 4],
    /// Upper clamp of dw, dh before `exp` (log(1000/16)).
    pub bbox_xform_clip: f64,
}

impl BoxCoder {
    /// A coder with the default clamp `ln(1000 / 16)`.
    pub fn new(weights: [f64; 4]) -> Self {
        BoxCoder {
            weights,
            bbox_xform_clip: default_bbox_xform_clip(),
        }
    }

    /// Regression targets `[N, 4]` of `matched_gt` `[N, 4]` relative to `proposals`
    /// `[N, 4]` (torchvision's `encode_single(reference_boxes, proposals)`).
    pub fn encode(&self, matched_gt: &Tensor, proposals: &Tensor) -> Result<Tensor> {
        let n = check_boxes("BoxCoder::encode", matched_gt)?;
        if check_boxes("BoxCoder::encode", proposals)? != n
            || proposals.dtype() != matched_gt.dtype()
        {
            return Err(Error::shape(
                "BoxCoder::encode",
                format!(
                    "matched_gt {} {:?} and proposals {} {:?}",
                    matched_gt.dtype(),
                    matched_gt.dims(),
                    proposals.dtype(),
                    proposals.dims()
                ),
            ));
        }
        self.check_weights("BoxCoder::encode")?;
        let [wx, wy, ww, wh] = self.weights;
        match same_device("BoxCoder::encode", &[matched_gt, proposals])? {
            Device::Cpu => with_dtype!(matched_gt.dtype(), T => {
                let (g, p) = (matched_gt.cpu_slice::<T>()?, proposals.cpu_slice::<T>()?);
                let w = [T::of(wx), T::of(wy), T::of(ww), T::of(wh)];
                let mut out = vec![T::zero(); 4 * n];
                crate::device::cpu::for_chunks(&mut out, 4 * 1024, |c, o| {
                    for (r, o) in o.chunks_exact_mut(4).enumerate() {
                        let i = c * 1024 + r;
                        o.copy_from_slice(&encode_one(&g[4 * i..4 * i + 4], &p[4 * i..4 * i + 4], w));
                    }
                });
                Tensor::from_vec(out, [n, 4])
            }),
            Device::Cuda(_) => {
                let dev = gpu_dev("BoxCoder::encode", matched_gt)?;
                let y = Tensor::gpu_empty(&dev, [n, 4])?;
                launch_elems(
                    &dev,
                    "box_encode_f32",
                    n,
                    &[
                        arg(matched_gt)?,
                        arg(proposals)?,
                        arg(&y)?,
                        KernelArg::I64(n as i64),
                        KernelArg::F32(wx as f32),
                        KernelArg::F32(wy as f32),
                        KernelArg::F32(ww as f32),
                        KernelArg::F32(wh as f32),
                    ],
                )?;
                Ok(y)
            }
        }
    }

    /// Boxes `[N, 4K]` decoded from `rel_codes` `[N, 4K]` (K sets of deltas per box,
    /// e.g. one per class) relative to `boxes` `[N, 4]` (torchvision's
    /// `decode_single`).
    pub fn decode(&self, rel_codes: &Tensor, boxes: &Tensor) -> Result<Tensor> {
        let n = check_boxes("BoxCoder::decode", boxes)?;
        let k = match rel_codes.dims() {
            [rn, c] if *rn == n && c % 4 == 0 => c / 4,
            d => {
                return Err(Error::shape(
                    "BoxCoder::decode",
                    format!(
                        "rel_codes {d:?} for boxes {:?} (expected [{n}, 4K])",
                        boxes.dims()
                    ),
                ))
            }
        };
        if rel_codes.dtype() != boxes.dtype() {
            return Err(Error::DType {
                op: "BoxCoder::decode",
                dtype: rel_codes.dtype().to_string(),
                msg: format!("rel_codes must have the boxes' dtype {}", boxes.dtype()),
            });
        }
        self.check_weights("BoxCoder::decode")?;
        let [wx, wy, ww, wh] = self.weights;
        let clip = self.bbox_xform_clip;
        match same_device("BoxCoder::decode", &[rel_codes, boxes])? {
            Device::Cpu => with_dtype!(boxes.dtype(), T => {
                let (r, b) = (rel_codes.cpu_slice::<T>()?, boxes.cpu_slice::<T>()?);
                let w = [T::of(wx), T::of(wy), T::of(ww), T::of(wh)];
                let clip = T::of(clip);
                // Every element is written.
                let mut out = crate::tensor::pool::take::<T>(4 * n * k);
                crate::device::cpu::for_chunks(&mut out, 4 * 1024, |c, o| {
                    for (q, o) in o.chunks_exact_mut(4).enumerate() {
                        let e = c * 1024 + q;
                        let i = e / k.max(1);
                        o.copy_from_slice(&decode_one(&r[4 * e..4 * e + 4], &b[4 * i..4 * i + 4], w, clip));
                    }
                });
                Tensor::from_vec(out, [n, 4 * k])
            }),
            Device::Cuda(_) => {
                let dev = gpu_dev("BoxCoder::decode", boxes)?;
                let y = Tensor::gpu_empty(&dev, [n, 4 * k])?;
                launch_elems(
                    &dev,
                    "box_decode_f32",
                    n * k,
                    &[
                        arg(rel_codes)?,
                        arg(boxes)?,
                        arg(&y)?,
                        KernelArg::I64(n as i64),
                        KernelArg::I64(k as i64),
                        KernelArg::F32(wx as f32),
                        KernelArg::F32(wy as f32),
                        KernelArg::F32(ww as f32),
                        KernelArg::F32(wh as f32),
                        KernelArg::F32(clip as f32),
                    ],
                )?;
                Ok(y)
            }
        }
    }

    fn check_weights(&self, op: &'static str) -> Result<()> {
        if self.weights.iter().any(|w| !w.is_finite() || *w == 0.0) || self.bbox_xform_clip.is_nan()
        {
            return Err(Error::invalid(
                op,
                format!(
                    "weights {:?} must be finite and non-zero, clip {} a number",
                    self.weights, self.bbox_xform_clip
                ),
            ));
        }
        Ok(())
    }
}

/// Targets of one gt box `g` relative to one proposal `p`.
fn encode_one<T: Element>(g: &[T], p: &[T], [wx, wy, ww, wh]: [T; 4]) -> [T; 4] {
    let half = T::of(0.5);
    let (ew, eh) = (p[2] - p[0], p[3] - p[1]);
    let (ecx, ecy) = (p[0] + half * ew, p[1] + half * eh);
    let (gw, gh) = (g[2] - g[0], g[3] - g[1]);
    let (gcx, gcy) = (g[0] + half * gw, g[1] + half * gh);
    [
        wx * (gcx - ecx) / ew,
        wy * (gcy - ecy) / eh,
        ww * (gw / ew).ln(),
        wh * (gh / eh).ln(),
    ]
}

/// One box from codes `r` relative to box `b`.
fn decode_one<T: Element>(r: &[T], b: &[T], [wx, wy, ww, wh]: [T; 4], clip: T) -> [T; 4] {
    let half = T::of(0.5);
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let (cx, cy) = (b[0] + half * w, b[1] + half * h);
    let (dx, dy) = (r[0] / wx, r[1] / wy);
    // torch.clamp(max=clip): std::min(d, clip), NaN passes through.
    let clamp = |d: T| if clip < d { clip } else { d };
    let (dw, dh) = (clamp(r[2] / ww), clamp(r[3] / wh));
    let (pcx, pcy) = (dx * w + cx, dy * h + cy);
    let (pw, ph) = (dw.exp() * w, dh.exp() * h);
    let (hw, hh) = (half * pw, half * ph);
    [pcx - hw, pcy - hh, pcx + hw, pcy + hh]
}
