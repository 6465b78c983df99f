//! Box ops on `(x1, y1, x2, y2)` boxes in pixels, with torchvision's semantics (no
//! "+1" anywhere): [`box_area`], [`box_iou`], [`clip_boxes_to_image`],
//! [`remove_small_boxes`].
//!
//! The arithmetic follows torchvision step by step in the input's float type, so the
//! CPU results equal torchvision's bit for bit; the CUDA kernels (kernels/boxes.cu)
//! use the same operations without FMA contraction. NaN coordinates propagate (an
//! IoU with a NaN box is NaN; a clipped NaN stays NaN; a box with a NaN side is never
//! kept by [`remove_small_boxes`]).
//!
//! These ops are not differentiable: detection applies them to detached proposals
//! and targets, so they record nothing on the tape.

use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Element, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev, launch_elems};

/// Error unless `t` is a float tensor of shape `[N, 4]`; returns `N`.
pub(crate) fn check_boxes(op: &'static str, t: &Tensor) -> Result<usize> {
    check_float(op, t)?;
    match t.dims() {
        [n, 4] => Ok(*n),
        d => Err(Error::shape(op, format!("boxes must be [N, 4], got {d:?}"))),
    }
}

/// Error unless `t` is f32/f64 (and f32 on CUDA).
pub(crate) fn check_float(op: &'static str, t: &Tensor) -> Result<()> {
    match (t.dtype(), t.device()) {
        (DType::F32, _) | (DType::F64, Device::Cpu) => Ok(()),
        (d, dev) => Err(Error::DType {
            op,
            dtype: d.to_string(),
            msg: format!("expected a float tensor (f32 on CUDA), tensor is on {dev}"),
        }),
    }
}

/// `max(a, b)` as torch.maximum: NaN in either operand gives NaN.
fn nan_max<T: Element>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        T::nan()
    } else if a > b {
        a
    } else {
        b
    }
}

/// `min(a, b)` as torch.minimum: NaN in either operand gives NaN.
fn nan_min<T: Element>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        T::nan()
    } else if a < b {
        a
    } else {
        b
    }
}

/// Area of one box, `(x2 - x1) * (y2 - y1)`.
fn area<T: Element>(b: &[T]) -> T {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Area of each box: `[N, 4]` -> `[N]` (square pixels). Inverted boxes have negative
/// or zero area, as in torchvision.
pub fn box_area(boxes: &Tensor) -> Result<Tensor> {
    let n = check_boxes("box_area", boxes)?;
    match boxes.device() {
        Device::Cpu => with_dtype!(boxes.dtype(), T => {
            let b = boxes.cpu_slice::<T>()?;
            Tensor::from_vec(b.chunks_exact(4).map(area).collect::<Vec<T>>(), [n])
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("box_area", boxes)?;
            let y = Tensor::gpu_empty(&dev, [n])?;
            launch_elems(
                &dev,
                "box_area_f32",
                n,
                &[arg(boxes)?, arg(&y)?, KernelArg::I64(n as i64)],
            )?;
            Ok(y)
        }
    }
}

/// Pairwise intersection over union: boxes1 `[N, 4]`, boxes2 `[M, 4]` -> `[N, M]`.
/// `inter / (area1 + area2 - inter)` exactly as torchvision computes it (0/0 = NaN
/// for two empty boxes, as there).
pub fn box_iou(boxes1: &Tensor, boxes2: &Tensor) -> Result<Tensor> {
    let n = check_boxes("box_iou", boxes1)?;
    let m = check_boxes("box_iou", boxes2)?;
    let device = same_device("box_iou", &[boxes1, boxes2])?;
    if boxes1.dtype() != boxes2.dtype() {
        return Err(Error::DType {
            op: "box_iou",
            dtype: boxes2.dtype().to_string(),
            msg: format!("mixed with {}", boxes1.dtype()),
        });
    }
    match device {
        Device::Cpu => with_dtype!(boxes1.dtype(), T => box_iou_cpu::<T>(boxes1, boxes2, n, m)),
        Device::Cuda(_) => {
            let dev = gpu_dev("box_iou", boxes1)?;
            let y = Tensor::gpu_empty(&dev, [n, m])?;
            launch_elems(
                &dev,
                "box_iou_f32",
                n * m,
                &[
                    arg(boxes1)?,
                    arg(boxes2)?,
                    arg(&y)?,
                    KernelArg::I64(n as i64),
                    KernelArg::I64(m as i64),
                ],
            )?;
            Ok(y)
        }
    }
}

fn box_iou_cpu<T: Element>(boxes1: &Tensor, boxes2: &Tensor, n: usize, m: usize) -> Result<Tensor> {
    let (a, b) = (boxes1.cpu_slice::<T>()?, boxes2.cpu_slice::<T>()?);
    let area2: Vec<T> = b.chunks_exact(4).map(area).collect();
    let mut out = vec![T::zero(); n * m];
    crate::device::cpu::for_chunks(&mut out, m.max(1), |i, row| {
        let p = &a[4 * i..4 * i + 4];
        let area1 = area(p);
        for (j, o) in row.iter_mut().enumerate() {
            let q = &b[4 * j..4 * j + 4];
            let w = nan_min(p[2], q[2]) - nan_max(p[0], q[0]);
            let h = nan_min(p[3], q[3]) - nan_max(p[1], q[1]);
            // clamp(min=0) keeps NaN.
            let w = if w < T::zero() { T::zero() } else { w };
            let h = if h < T::zero() { T::zero() } else { h };
            let inter = w * h;
            *o = inter / (area1 + area2[j] - inter);
        }
    });
    Tensor::from_vec(out, [n, m])
}

/// Clamp boxes `[..., 4]` into an image of `size = (height, width)` pixels: x to
/// `[0, width]`, y to `[0, height]`. NaN stays NaN (torch.clamp).
pub fn clip_boxes_to_image(boxes: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    check_float("clip_boxes_to_image", boxes)?;
    if boxes.dims().last() != Some(&4) {
        return Err(Error::shape(
            "clip_boxes_to_image",
            format!("boxes must be [..., 4], got {:?}", boxes.dims()),
        ));
    }
    let (height, width) = size;
    let n = boxes.numel() / 4;
    match boxes.device() {
        Device::Cpu => with_dtype!(boxes.dtype(), T => {
            let (h, w) = (T::of(height as f64), T::of(width as f64));
            let b = boxes.cpu_slice::<T>()?;
            let out: Vec<T> = b
                .iter()
                .enumerate()
                .map(|(e, &v)| clamp_torch(v, if e % 2 == 1 { h } else { w }))
                .collect();
            Tensor::from_vec(out, boxes.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("clip_boxes_to_image", boxes)?;
            let y = Tensor::gpu_empty(&dev, boxes.shape().clone())?;
            launch_elems(
                &dev,
                "box_clip_f32",
                4 * n,
                &[
                    arg(boxes)?,
                    arg(&y)?,
                    KernelArg::I64(n as i64),
                    KernelArg::F32(height as f32),
                    KernelArg::F32(width as f32),
                ],
            )?;
            Ok(y)
        }
    }
}

/// `std::min(std::max(v, 0), hi)`, torch.clamp's scalar path (NaN passes through).
fn clamp_torch<T: Element>(v: T, hi: T) -> T {
    let v = if v < T::zero() { T::zero() } else { v };
    if hi < v {
        hi
    } else {
        v
    }
}

/// Indices (i64, ascending) of the boxes `[N, 4]` whose width and height are both
/// `>= min_size` pixels. The comparison is made in the boxes' float type, as torch
/// does. On CUDA the filter runs on the device; the count is read back to size the
/// result (one synchronisation).
pub fn remove_small_boxes(boxes: &Tensor, min_size: f64) -> Result<Tensor> {
    check_boxes("remove_small_boxes", boxes)?;
    if min_size.is_nan() {
        return Err(Error::invalid("remove_small_boxes", "min_size is NaN"));
    }
    match boxes.device() {
        Device::Cpu => with_dtype!(boxes.dtype(), T => {
            let m = T::of(min_size);
            let b = boxes.cpu_slice::<T>()?;
            let keep: Vec<i64> = b
                .chunks_exact(4)
                .enumerate()
                .filter(|(_, p)| p[2] - p[0] >= m && p[3] - p[1] >= m)
                .map(|(i, _)| i as i64)
                .collect();
            let k = keep.len();
            Tensor::from_vec_i64(keep, [k])
        }),
        Device::Cuda(_) => {
            let (keep, count) = remove_small_boxes_device(boxes, min_size)?;
            let k = count.to_vec_i64()?[0] as usize;
            prefix_i64(&keep, k)
        }
    }
}

/// CUDA [`remove_small_boxes`] without synchronising: returns `keep` `[N]` (i64; the
/// first `count` entries are the kept indices, ascending; the rest unspecified) and
/// `count` `[1]` (i64), both on the device.
pub fn remove_small_boxes_device(boxes: &Tensor, min_size: f64) -> Result<(Tensor, Tensor)> {
    let n = check_boxes("remove_small_boxes", boxes)?;
    if min_size.is_nan() {
        return Err(Error::invalid("remove_small_boxes", "min_size is NaN"));
    }
    let dev = gpu_dev("remove_small_boxes", boxes)?;
    let keep = Tensor::gpu_empty_i64(&dev, [n])?;
    if n == 0 {
        // Nothing to scan (and an empty buffer is no argument): the count is 0.
        return Ok((keep, Tensor::gpu_zeros_i64(&dev, [1])?));
    }
    // The kernel writes the count and the first `count` keep entries.
    let count = Tensor::gpu_empty_i64(&dev, [1])?;
    let threads = (n.div_ceil(32) * 32).clamp(32, 1024) as u32;
    dev.launch(
        "box_remove_small_f32",
        LaunchCfg::linear(threads as usize, threads),
        &[
            arg(boxes)?,
            KernelArg::I64(n as i64),
            KernelArg::F32(min_size as f32),
            arg(&keep)?,
            arg(&count)?,
        ],
    )?;
    Ok((keep, count))
}

/// The first `k` elements of a 1-D i64 tensor as a new tensor on the same device.
pub(crate) fn prefix_i64(t: &Tensor, k: usize) -> Result<Tensor> {
    match t.device() {
        Device::Cpu => Tensor::from_vec_i64(t.cpu_i64()?[..k].to_vec(), [k]),
        Device::Cuda(_) => {
            let g = t.gpu()?;
            let out = Tensor::gpu_empty_i64(&g.dev, [k])?;
            g.dev.backend.copy_dtod(&g.buf, &out.gpu()?.buf, k * 8)?;
            Ok(out)
        }
    }
}
