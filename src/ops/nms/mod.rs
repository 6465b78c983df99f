//! Greedy non-maximum suppression, exactly torchvision's result.
//!
//! Semantics (torchvision `nms`, CPU kernel): boxes are visited in the order of a
//! stable descending sort of the scores (equal scores keep their input order); a box
//! is kept unless a kept box before it has `IoU > iou_threshold` with it. The IoU of
//! kept box `a` and candidate `b` is computed as torchvision's CPU kernel does, in the
//! boxes' float type: `xx1 = std::max(a.x1, b.x1)` (and min/max for the others, with
//! C++'s NaN behaviour), `w = max(0, xx2 - xx1)`, `inter = w * h`,
//! `ovr = inter / (area_a + area_b - inter)`, compared as `f64` with the threshold.
//! The keep list holds original indices in that visiting order.
//!
//! Non-finite inputs follow from those formulas and are never an error:
//! - a NaN score ranks above `+inf` (torch's sort), NaN scores keep input order;
//!   `-0.0` and `+0.0` are equal scores;
//! - a box with a NaN coordinate has a NaN area, so every IoU with it is NaN: it is
//!   kept (in score order), never suppresses and is never suppressed; the same holds
//!   for boxes with an infinite side whenever the threshold is `>= 0`.
//!
//! A NaN threshold is an error. Thresholds below 0 are allowed (every box a kept box
//! overlaps with a finite IoU is suppressed) and use the plain O(N²) loop.
//!
//! CPU: sort once (parallel for large N), gather the boxes in sorted order, and
//! check each candidate only against the kept boxes that could suppress it, found
//! through an index: below a threshold of 0.6 a uniform grid of the cells each kept
//! box covers (only overlapping boxes can suppress each other), from 0.6 a grid per
//! area class keyed by box centre (a suppressor has a similar area and a nearby
//! centre). The IoU test itself is always torchvision's. Large inputs are processed
//! in chunks: each chunk is first checked in parallel against the boxes kept before
//! it, then its survivors are resolved in order. CUDA: the whole computation stays on the
//! device (kernels/nms.cu): key sort, IoU bitmask, a one-block walk of the mask, and a
//! device keep list plus count ([`nms_device`]).
//!
//! [`batched_nms`] suppresses only within equal `idxs` (classes or FPN levels). It is
//! torchvision's per-class ("vanilla") result, kept indices in descending score order
//! (ties by index). torchvision itself switches to an offset trick for small inputs
//! (up to 1000 boxes on the CPU); that trick adds `idx * (max + 1)` to the
//! coordinates and can round IoUs differently — only per-class NMS is defined here.

mod cpu;
mod cuda;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, DType, Tensor};
use crate::with_dtype;

use super::boxes::{check_boxes, prefix_i64};
use cpu::{gather, greedy_reference, nms_cpu};
use cuda::{nms_cuda, nms_groups_cuda, nms_groups_top_cuda};

pub(crate) use cpu::{descending_key, sort_descending};

/// NMS result left on the device: `keep` `[N]` i64 holds the kept original indices
/// in its first `count` entries (the rest are -1); `count` `[1]` i64. Both are on
/// the input's device (CPU tensors for CPU inputs).
#[derive(Clone, Debug)]
pub struct NmsOutput {
    /// Kept original indices, `[N]` i64, in descending score order, padded with -1.
    pub keep: Tensor,
    /// Number of kept boxes, `[1]` i64.
    pub count: Tensor,
}

impl NmsOutput {
    /// The kept indices as an exact-length tensor on the same device (reads the count:
    /// one synchronisation on CUDA).
    pub fn into_keep(self) -> Result<Tensor> {
        let k = self.count.to_vec_i64()?[0] as usize;
        prefix_i64(&self.keep, k)
    }
}

/// Indices (i64) of the boxes `[N, 4]` kept by greedy NMS with `scores` `[N]`, in
/// descending score order (see the module docs for the exact rule).
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Result<Tensor> {
    nms_device(boxes, scores, None, iou_threshold)?.into_keep()
}

/// NMS within groups: boxes with different `idxs` `[N]` (i64 class or level
/// indices) never suppress each other. Kept indices in descending score order.
pub fn batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
) -> Result<Tensor> {
    nms_device(boxes, scores, Some(idxs), iou_threshold)?.into_keep()
}

/// [`nms`] (or [`batched_nms`] with `idxs`) without reading anything back: on CUDA
/// every step runs on the device and the result is a device keep list plus count.
pub fn nms_device(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    iou_threshold: f64,
) -> Result<NmsOutput> {
    let n = check_inputs(boxes, scores, idxs, iou_threshold)?;
    match boxes.device() {
        Device::Cpu => {
            let cls = idxs.map(|t| t.cpu_i64()).transpose()?;
            let keep = with_dtype!(boxes.dtype(), T => {
                let (b, s) = (boxes.cpu_slice::<T>()?, scores.cpu_slice::<T>()?);
                nms_cpu(b, s, cls, iou_threshold)
            });
            let k = keep.len();
            let mut padded = keep;
            padded.resize(n, -1);
            Ok(NmsOutput {
                keep: Tensor::from_vec_i64(padded, [n])?,
                count: Tensor::from_vec_i64(vec![k as i64], [1])?,
            })
        }
        Device::Cuda(_) => nms_cuda(boxes, scores, idxs, n, iou_threshold),
    }
}

/// NMS within groups, each group on its own: `groups` `[N]` i64; candidates of a
/// negative group are left out (never kept, never suppress). The result equals
/// [`batched_nms`] over the candidates of non-negative groups: kept indices in
/// descending score order (ties by index), on the device as a keep list padded with
/// -1 plus a count, nothing read back.
///
/// Unlike [`nms_device`], no IoU mask over all candidates is built: on CUDA every
/// group is walked by its own block, all groups in parallel, so memory is O(N)
/// (about 40 bytes per candidate) and boxes of different groups (images, classes,
/// levels) are never compared.
pub fn nms_groups_device(
    boxes: &Tensor,
    scores: &Tensor,
    groups: &Tensor,
    iou_threshold: f64,
) -> Result<NmsOutput> {
    let n = check_inputs(boxes, scores, Some(groups), iou_threshold)?;
    match boxes.device() {
        Device::Cpu => {
            let cls = groups.cpu_i64()?;
            let keep = with_dtype!(boxes.dtype(), T => {
                let (b, s) = (boxes.cpu_slice::<T>()?, scores.cpu_slice::<T>()?);
                nms_cpu(b, s, Some(cls), iou_threshold)
            });
            // In place: `keep` is a host-pool buffer with room for `n`.
            let mut padded = keep;
            padded.retain(|&i| cls[i as usize] >= 0);
            let k = padded.len();
            padded.resize(n, -1);
            Ok(NmsOutput {
                keep: Tensor::from_vec_i64(padded, [n])?,
                count: Tensor::from_vec_i64(vec![k as i64], [1])?,
            })
        }
        Device::Cuda(_) => {
            if boxes.dtype() != DType::F32 {
                return Err(Error::DType {
                    op: "nms_groups",
                    dtype: boxes.dtype().to_string(),
                    msg: "CUDA NMS takes f32 boxes".into(),
                });
            }
            // Booked as the NMS's own memory (scratch and outputs) when profiling.
            let _mem = crate::device::op_memory::scope(&boxes.gpu()?.dev, "nms_groups");
            nms_groups_cuda(boxes, scores, groups, n, iou_threshold)
        }
    }
}

/// [`nms_groups_device`] for a batch of `images` whose candidates are image-major in
/// equal chunks (`N / images` each, and no group spans two chunks), keeping only
/// each image's first `top` kept candidates: `keep` `[images * top]` i64 holds every
/// image's selection in image order, each in descending score order (ties by index),
/// padded with -1 past `count`. Per image this is [`nms_groups_device`]'s keep list
/// cut at `top`, so a per-image selection from either is the same.
///
/// On CUDA the batch is processed in passes of whole images (up to 2^17 candidates
/// per pass, at least one image), all groups of a pass walked in parallel; the
/// scratch is that of one pass, so memory does not grow with the batch (about 40
/// bytes per candidate of a pass). Nothing is read back.
pub fn nms_groups_top_device(
    boxes: &Tensor,
    scores: &Tensor,
    groups: &Tensor,
    iou_threshold: f64,
    images: usize,
    top: usize,
) -> Result<NmsOutput> {
    let n = check_inputs(boxes, scores, Some(groups), iou_threshold)?;
    if (images == 0 && n > 0) || (images > 0 && n % images != 0) {
        return Err(Error::invalid(
            "nms_groups_top",
            format!("{n} candidates are not {images} equal image chunks"),
        ));
    }
    match boxes.device() {
        Device::Cpu => {
            let cls = groups.cpu_i64()?;
            let keep = with_dtype!(boxes.dtype(), T => {
                let (b, s) = (boxes.cpu_slice::<T>()?, scores.cpu_slice::<T>()?);
                nms_cpu(b, s, Some(cls), iou_threshold)
            });
            let chunk = n / images.max(1);
            let mut per_image = vec![Vec::new(); images];
            for &i in &keep {
                let img = i as usize / chunk;
                if cls[i as usize] >= 0 && per_image[img].len() < top {
                    per_image[img].push(i);
                }
            }
            crate::tensor::pool::give(keep);
            let mut padded: Vec<i64> = per_image.concat();
            let k = padded.len();
            padded.resize(images * top, -1);
            Ok(NmsOutput {
                keep: Tensor::from_vec_i64(padded, [images * top])?,
                count: Tensor::from_vec_i64(vec![k as i64], [1])?,
            })
        }
        Device::Cuda(_) => {
            if boxes.dtype() != DType::F32 {
                return Err(Error::DType {
                    op: "nms_groups_top",
                    dtype: boxes.dtype().to_string(),
                    msg: "CUDA NMS takes f32 boxes".into(),
                });
            }
            let _mem = crate::device::op_memory::scope(&boxes.gpu()?.dev, "nms_groups");
            nms_groups_top_cuda(boxes, scores, groups, n, iou_threshold, images, top)
        }
    }
}

/// torchvision's CPU NMS loop, transcribed: O(N²), for tests and as the definition.
/// CPU tensors only.
pub fn nms_reference(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    iou_threshold: f64,
) -> Result<Tensor> {
    check_inputs(boxes, scores, idxs, iou_threshold)?;
    let cls = idxs.map(|t| t.cpu_i64()).transpose()?;
    let keep = with_dtype!(boxes.dtype(), T => {
        let (b, s) = (boxes.cpu_slice::<T>()?, scores.cpu_slice::<T>()?);
        let order = sort_descending(s);
        let sb = gather(b, cls, &order);
        greedy_reference(&sb, iou_threshold)
            .into_iter()
            .map(|p| order[p] as i64)
            .collect::<Vec<i64>>()
    });
    let k = keep.len();
    Tensor::from_vec_i64(keep, [k])
}

fn check_inputs(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    iou_threshold: f64,
) -> Result<usize> {
    let n = check_boxes("nms", boxes)?;
    if scores.dims() != [n] {
        return Err(Error::shape(
            "nms",
            format!("scores {:?} for boxes {:?}", scores.dims(), boxes.dims()),
        ));
    }
    if scores.dtype() != boxes.dtype() {
        return Err(Error::DType {
            op: "nms",
            dtype: scores.dtype().to_string(),
            msg: format!("scores must have the boxes' dtype {}", boxes.dtype()),
        });
    }
    let mut all = vec![boxes, scores];
    if let Some(c) = idxs {
        if c.dtype() != DType::I64 || c.dims() != [n] {
            return Err(Error::shape(
                "batched_nms",
                format!("idxs must be i64 [{n}], got {} {:?}", c.dtype(), c.dims()),
            ));
        }
        all.push(c);
    }
    same_device("nms", &all)?;
    if iou_threshold.is_nan() {
        return Err(Error::invalid("nms", "iou_threshold is NaN"));
    }
    if n > u32::MAX as usize {
        return Err(Error::invalid(
            "nms",
            format!("{n} boxes (at most 2^32 - 1)"),
        ));
    }
    Ok(n)
}
