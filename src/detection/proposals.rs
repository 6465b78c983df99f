//! Selection of RPN proposals and of box-head detections for a whole batch, on the
//! batch's device, with torchvision's semantics (`RegionProposalNetwork.filter_proposals`
//! and `RoIHeads.postprocess_detections`).
//!
//! Both are one fixed-size pipeline per batch, never a loop over images:
//! - proposals: [`topk_levels`] on the objectness logits (all levels and images in one
//!   launch), gather the selected anchors and deltas, [`BoxCoder::decode`] them, then a
//!   filter (clip to the image, sigmoid, drop boxes with a side `< min_size` or a score
//!   `< score_thresh`);
//! - detections: [`BoxCoder::decode`] of every class's box, then a filter (softmax,
//!   drop background, clip, score `> score_thresh`, drop boxes with a side `< min_size`);
//!
//! then one grouped NMS over the batch ([`nms_groups_device`]; groups are (image,
//! level) or (image, class), each walked on its own, so boxes of different images,
//! levels or classes are never compared and no mask over the whole batch is built)
//! and a selection of each image's first kept boxes (on a device, the padded
//! detection selection runs the NMS in passes of whole images instead,
//! [`nms_groups_top_device`], so its memory is one pass's, not the batch's). A candidate that fails the
//! filter is not removed (that would need its count on the host): it gets the score
//! `-inf` and the group -1, which leaves it out of the NMS. The result is padded (`[N, top, 4]`) with a count per image, so on
//! CUDA nothing is read back; reading the counts is left to the caller.
//!
//! Order: NMS visits boxes by descending score, ties by candidate index; candidate
//! indices are image-major, then (level, top-k rank) or (proposal, class), so each
//! image's result is exactly torchvision's per-image order. CPU and CUDA run the same
//! steps (the CUDA kernels are kernels/proposals.cu; the CPU twins are below).

use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::nms::{nms_device, nms_groups_device, nms_groups_top_device, NmsOutput};
use crate::ops::topk::topk_levels;
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{pool, DType, Tensor};

use super::box_coder::BoxCoder;

/// Most FPN levels the proposal filter takes (PROPOSALS_MAX_LEVELS in
/// kernels/proposals.cu; top-k on CUDA takes as many).
pub const MAX_LEVELS: usize = 8;

/// Settings of the proposal selection (one mode of the RPN: train or test).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProposalParams {
    /// Candidates per level and image taken by top-k on objectness.
    pub pre_nms_top_n: usize,
    /// Proposals kept per image after NMS.
    pub post_nms_top_n: usize,
    /// IoU above which NMS suppresses (within one level of one image).
    pub nms_thresh: f64,
    /// Proposals need `sigmoid(objectness) >= score_thresh`.
    pub score_thresh: f32,
    /// Proposals need both sides `>= min_size` pixels after clipping.
    pub min_size: f32,
}

/// Settings of the box-head postprocess.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectionParams {
    /// Detections need a class probability `> score_thresh`.
    pub score_thresh: f32,
    /// Detections need both sides `>= min_size` pixels after clipping.
    pub min_size: f32,
    /// IoU above which NMS suppresses (within one class of one image).
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: usize,
}

/// Boxes selected per image, padded to `top` rows, on the inputs' device.
#[derive(Clone, Debug)]
pub struct Selected {
    /// `[N, top, 4]` boxes (x1, y1, x2, y2, pixels); rows past the count are zero.
    pub boxes: Tensor,
    /// `[N, top]` scores (sigmoid objectness or class probability); zero padding.
    pub scores: Tensor,
    /// `[N, top]` i64 candidate index of each box (see the module docs); -1 padding.
    pub indices: Tensor,
    /// `[N]` i64: how many rows of each image are real.
    pub counts: Tensor,
}

impl Selected {
    /// The counts on the host (one read on CUDA).
    pub fn host_counts(&self) -> Result<Vec<usize>> {
        Ok(self
            .counts
            .to_vec_i64()?
            .into_iter()
            .map(|c| c as usize)
            .collect())
    }

    /// Image `n`'s boxes `[counts[n], 4]` (a copy on the same device).
    pub fn image_boxes(&self, n: usize, count: usize) -> Result<Tensor> {
        let top = self.boxes.dims()[1];
        let flat = self
            .boxes
            .reshape_detached([self.boxes.dims()[0] * top, 4])?;
        crate::ops::narrow(&flat, 0, n * top, count)
    }
}

/// Candidates for one batched NMS: boxes `[M, 4]`, scores `[M]` (`-inf` for rejected
/// ones), groups `[M]` i64 (-1 for rejected ones).
struct Candidates {
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
}

/// torchvision's `filter_proposals` for a batch: objectness logits `[N, A]` and
/// deltas `[N, A, 4]` in the flattened head order, anchors `[A, 4]` (shared by the
/// images), `level_sizes` (anchors per level, summing to `A`), `image_sizes[n] = (h,
/// w)` pixels. Returns up to `post_nms_top_n` proposals per image, padded.
pub fn select_proposals(
    objectness: &Tensor,
    deltas: &Tensor,
    anchors: &Tensor,
    level_sizes: &[usize],
    image_sizes: &[(usize, usize)],
    p: &ProposalParams,
) -> Result<Selected> {
    let (n, a) = match objectness.dims() {
        [n, a] => (*n, *a),
        d => return Err(shape_err(format!("objectness {d:?} (expected [N, A])"))),
    };
    if deltas.dims() != [n, a, 4] || anchors.dims() != [a, 4] || image_sizes.len() != n {
        return Err(shape_err(format!(
            "objectness {:?}, deltas {:?}, anchors {:?} and {} image sizes",
            objectness.dims(),
            deltas.dims(),
            anchors.dims(),
            image_sizes.len()
        )));
    }
    if level_sizes.is_empty() || level_sizes.len() > MAX_LEVELS {
        return Err(Error::invalid(
            "select_proposals",
            format!("{} levels (1 to {MAX_LEVELS})", level_sizes.len()),
        ));
    }
    check_f32("select_proposals", &[objectness, deltas, anchors])?;
    crate::tensor::same_device("select_proposals", &[objectness, deltas, anchors])?;
    let (logits, idx) = topk_levels(objectness, level_sizes, p.pre_nms_top_n)?;
    let k = logits.dims()[1];
    let (codes, refs) = gather(&idx, deltas, anchors)?;
    let decoded = BoxCoder::new([1.0; 4]).decode(&codes, &refs)?;
    let mut ends = Vec::with_capacity(level_sizes.len());
    let mut end = 0;
    for &l in level_sizes {
        end += l.min(p.pre_nms_top_n);
        ends.push(end);
    }
    let sizes = sizes_tensor(image_sizes, objectness.device())?;
    let c = filter_proposals(&decoded, &logits, &sizes, n, k, &ends, p)?;
    let keep = nms_groups_device(&c.boxes, &c.scores, &c.groups, p.nms_thresh)?;
    select(&keep, &c, level_sizes.len(), n, p.post_nms_top_n)
}

/// torchvision's `postprocess_detections` for a batch: class logits `[R, C]`, box
/// regression `[R, 4C]` (weights `coder`), the proposals `[R, 4]` of all images
/// concatenated with `rows_per_image[n]` rows of image `n`. Returns up to
/// `detections_per_img` detections per image, padded; a detection's class is
/// `indices % (C - 1) + 1`.
pub fn select_detections(
    class_logits: &Tensor,
    box_regression: &Tensor,
    proposals: &Tensor,
    rows_per_image: &[usize],
    image_sizes: &[(usize, usize)],
    coder: &BoxCoder,
    p: &DetectionParams,
) -> Result<Selected> {
    let (r, c) = match class_logits.dims() {
        [r, c] if *c >= 1 => (*r, *c),
        d => return Err(shape_err(format!("class logits {d:?} (expected [R, C])"))),
    };
    if box_regression.dims() != [r, 4 * c]
        || proposals.dims() != [r, 4]
        || rows_per_image.iter().sum::<usize>() != r
        || rows_per_image.len() != image_sizes.len()
    {
        return Err(shape_err(format!(
            "class logits {:?}, box regression {:?}, proposals {:?}, rows per image {:?}, {} image sizes",
            class_logits.dims(),
            box_regression.dims(),
            proposals.dims(),
            rows_per_image,
            image_sizes.len()
        )));
    }
    check_f32(
        "select_detections",
        &[class_logits, box_regression, proposals],
    )?;
    let device = crate::tensor::same_device(
        "select_detections",
        &[class_logits, box_regression, proposals],
    )?;
    let decoded = coder.decode(box_regression, proposals)?;
    if device == Device::Cpu {
        return detections_cpu(class_logits, &decoded, rows_per_image, image_sizes, p);
    }
    let row_image: Vec<i64> = rows_per_image
        .iter()
        .enumerate()
        .flat_map(|(n, &k)| std::iter::repeat_n(n as i64, k))
        .collect();
    let row_image = Tensor::from_vec_i64(row_image, [r])?.to_device(device)?;
    let sizes = sizes_tensor(image_sizes, device)?;
    let cand = filter_detections(class_logits, &decoded, &row_image, &sizes, p)?;
    let keep = nms_groups_device(&cand.boxes, &cand.scores, &cand.groups, p.nms_thresh)?;
    select(&keep, &cand, c, image_sizes.len(), p.detections_per_img)
}

/// [`select_detections`] on padded rows: class logits `[N P, C]` and box regression
/// `[N P, 4C]` of the proposals `[N, P, 4]`, of which the first `counts[n]` (i64 `[N]`,
/// on the device) rows of image `n` are real. Padding rows are rejected in the
/// filter, so they never reach NMS: the result is [`select_detections`]'s on the real
/// rows, except that a candidate index counts padded rows (`row * (C - 1) + class -
/// 1` with `row = n P + i`; the class is still `indices % (C - 1) + 1`). Nothing is
/// read back and no size depends on the data: the whole selection can be captured as
/// a device graph.
pub fn select_detections_padded(
    class_logits: &Tensor,
    box_regression: &Tensor,
    proposals: &Tensor,
    counts: &Tensor,
    image_sizes: &[(usize, usize)],
    coder: &BoxCoder,
    p: &DetectionParams,
) -> Result<Selected> {
    let (n, per_image) = match proposals.dims() {
        [n, pi, 4] => (*n, *pi),
        d => return Err(shape_err(format!("proposals {d:?} (expected [N, P, 4])"))),
    };
    let r = n * per_image;
    let c = match class_logits.dims() {
        [rows, c] if *rows == r && *c >= 1 => *c,
        d => {
            return Err(shape_err(format!(
                "class logits {d:?} for proposals {:?} (expected [{r}, C])",
                proposals.dims()
            )))
        }
    };
    if box_regression.dims() != [r, 4 * c]
        || counts.dims() != [n]
        || counts.dtype() != DType::I64
        || image_sizes.len() != n
    {
        return Err(shape_err(format!(
            "class logits {:?}, box regression {:?}, proposals {:?}, counts {:?} {}, {} image sizes",
            class_logits.dims(),
            box_regression.dims(),
            proposals.dims(),
            counts.dims(),
            counts.dtype(),
            image_sizes.len()
        )));
    }
    check_f32(
        "select_detections_padded",
        &[class_logits, box_regression, proposals],
    )?;
    let device = crate::tensor::same_device(
        "select_detections_padded",
        &[class_logits, box_regression, proposals, counts],
    )?;
    let decoded = coder.decode(box_regression, &proposals.reshape_detached([r, 4])?)?;
    let sizes = sizes_tensor(image_sizes, device)?;
    let cand = match device {
        Device::Cpu => {
            let counts = counts.cpu_i64()?;
            roi_candidates_cpu(class_logits, &decoded, &sizes, p, |row| {
                let img = row / per_image.max(1);
                (img, ((row - img * per_image) as i64) < counts[img])
            })?
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("select_detections_padded", class_logits)?;
            let cand = gpu_candidates(&dev, r * (c - 1))?;
            if cand.groups.numel() > 0 {
                launch_elems(
                    &dev,
                    "proposals_roi_filter_padded_f32",
                    r * (c - 1),
                    &[
                        arg(class_logits)?,
                        arg(&decoded)?,
                        counts.gpu()?.buf.arg(),
                        arg(&sizes)?,
                        KernelArg::I64(n as i64),
                        KernelArg::I64(per_image as i64),
                        KernelArg::I64(c as i64),
                        KernelArg::F32(p.score_thresh),
                        KernelArg::F32(p.min_size),
                        arg(&cand.boxes)?,
                        arg(&cand.scores)?,
                        cand.groups.gpu()?.buf.arg(),
                    ],
                )?;
            }
            cand
        }
    };
    let keep = match device {
        Device::Cpu => nms_groups_device(&cand.boxes, &cand.scores, &cand.groups, p.nms_thresh)?,
        // The candidates are image-major, `per_image (C - 1)` per image: NMS in passes
        // of whole images keeping each image's first `detections_per_img`, so its
        // memory is one pass's, not the batch's (91 classes at batch 16: 1.44M
        // candidates).
        Device::Cuda(_) => nms_groups_top_device(
            &cand.boxes,
            &cand.scores,
            &cand.groups,
            p.nms_thresh,
            n,
            p.detections_per_img,
        )?,
    };
    select(&keep, &cand, c, n, p.detections_per_img)
}

/// Words before the rows in a [`PackedDetections`] buffer, per image: the detection
/// count and the proposal count.
const PACK_HEADER_WORDS: usize = 2;
/// Words per detection row in a [`PackedDetections`] buffer.
const PACK_ROW_WORDS: usize = 6;

/// Everything the host needs from an inference pass in one device buffer of 32-bit
/// words, so that reading it is ONE device-to-host copy (kernel
/// `proposals_pack_detections_f32`). For `N` images and `top` detections per image:
///
/// - words `0..N`: detections per image (i32);
/// - words `N..2N`: proposals per image (i32);
/// - then for image `n` and slot `s < top`, 6 words at `2N + 6 (n top + s)`: `x1, y1,
///   x2, y2` (f32, resized-image pixels), score (f32), label (i32, 1..C-1). Slots at
///   or past the image's count are all zero.
///
/// The buffer is a fixed `(2 + 6 top) N` words whatever was detected, so the pass
/// that writes it can be replayed as a graph.
#[derive(Clone, Debug)]
pub struct PackedDetections {
    /// The words (an f32 tensor holding the bits above), on the pass's device.
    pub words: Tensor,
    /// Images of the batch.
    pub images: usize,
    /// Detection slots per image.
    pub top: usize,
}

/// What one read of a [`PackedDetections`] gives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadDetections {
    /// Per image `(boxes, scores, labels)`, boxes in resized-image pixels.
    pub detections: Vec<super::Detections>,
    /// Proposals per image.
    pub proposal_counts: Vec<usize>,
}

impl PackedDetections {
    /// Pack a detection selection `sel` (`[N, top]` rows, candidate indices over
    /// `classes` classes with background) and the proposal counts `prop_counts`
    /// (i64 `[N]`) into one buffer on their device: one launch on a GPU.
    pub fn new(sel: &Selected, prop_counts: &Tensor, classes: usize) -> Result<PackedDetections> {
        let (n, top) = match sel.scores.dims() {
            [n, top] => (*n, *top),
            d => {
                return Err(shape_err(format!(
                    "selected scores {d:?} (expected [N, top])"
                )))
            }
        };
        if prop_counts.dims() != [n] || prop_counts.dtype() != DType::I64 || classes < 2 {
            return Err(shape_err(format!(
                "proposal counts {:?} {} for {n} images, {classes} classes",
                prop_counts.dims(),
                prop_counts.dtype()
            )));
        }
        let len = (PACK_HEADER_WORDS + PACK_ROW_WORDS * top) * n;
        let per_row = (classes - 1) as i64;
        let words = match sel.scores.device() {
            Device::Cpu => {
                let (dc, pc) = (sel.counts.cpu_i64()?, prop_counts.cpu_i64()?);
                let (b, sc, ix) = (
                    sel.boxes.cpu_slice::<f32>()?,
                    sel.scores.cpu_slice::<f32>()?,
                    sel.indices.cpu_i64()?,
                );
                let mut w = vec![0u32; len];
                for img in 0..n {
                    w[img] = dc[img] as i32 as u32;
                    w[n + img] = pc[img] as i32 as u32;
                    for s in 0..(dc[img].max(0) as usize).min(top) {
                        let slot = img * top + s;
                        let o = PACK_HEADER_WORDS * n + PACK_ROW_WORDS * slot;
                        for q in 0..4 {
                            w[o + q] = b[4 * slot + q].to_bits();
                        }
                        w[o + 4] = sc[slot].to_bits();
                        w[o + 5] = (ix[slot] % per_row + 1) as i32 as u32;
                    }
                }
                Tensor::from_vec(w.into_iter().map(f32::from_bits).collect(), [len])?
            }
            Device::Cuda(_) => {
                let dev = gpu_dev("PackedDetections", &sel.scores)?;
                let words = Tensor::gpu_empty(&dev, [len])?;
                if len > 0 {
                    launch_elems(
                        &dev,
                        "proposals_pack_detections_f32",
                        n * (top + PACK_HEADER_WORDS),
                        &[
                            sel.counts.gpu()?.buf.arg(),
                            arg(&sel.boxes)?,
                            arg(&sel.scores)?,
                            sel.indices.gpu()?.buf.arg(),
                            prop_counts.gpu()?.buf.arg(),
                            KernelArg::I64(n as i64),
                            KernelArg::I64(top as i64),
                            KernelArg::I64(per_row),
                            arg(&words)?,
                        ],
                    )?;
                }
                words
            }
        };
        Ok(PackedDetections {
            words,
            images: n,
            top,
        })
    }

    /// Read the buffer: ONE device-to-host copy on a GPU (which waits for the work
    /// before it; no other synchronisation).
    pub fn read(&self) -> Result<ReadDetections> {
        // The pass's end-of-step read-out: the emulator's plan mode lets it through.
        let w: Vec<u32> = {
            let _r = crate::device::emu::allow_readout("PackedDetections::read");
            self.words.to_vec::<f32>()?
        }
        .into_iter()
        .map(f32::to_bits)
        .collect();
        let (n, top) = (self.images, self.top);
        let count = |i: usize| -> Result<usize> {
            let c = w[i] as i32;
            if c < 0 || (i < n && c as usize > top) {
                return Err(Error::invalid(
                    "PackedDetections::read",
                    format!("count {c} in word {i} (top {top})"),
                ));
            }
            Ok(c as usize)
        };
        let mut out = ReadDetections::default();
        for img in 0..n {
            let k = count(img)?;
            out.proposal_counts.push(count(n + img)?);
            let mut d = super::Detections::default();
            for s in 0..k {
                let o = PACK_HEADER_WORDS * n + PACK_ROW_WORDS * (img * top + s);
                let f = |q: usize| f32::from_bits(w[o + q]);
                d.boxes.push([f(0), f(1), f(2), f(3)]);
                d.scores.push(f(4));
                d.labels.push(w[o + 5] as i32 as i64);
            }
            out.detections.push(d);
        }
        Ok(out)
    }
}

fn shape_err(msg: String) -> Error {
    Error::shape("proposals", msg)
}

fn check_f32(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    match ts.iter().find(|t| t.dtype() != DType::F32) {
        Some(t) => Err(Error::DType {
            op,
            dtype: t.dtype().to_string(),
            msg: "detection selection takes f32 tensors".into(),
        }),
        None => Ok(()),
    }
}

/// Image sizes as `[N, 2]` f32 (h, w) on `device`, no read back. On a GPU the last
/// few distinct size lists stay uploaded: a training run or an evaluation at fixed
/// sizes (every batch the same) then makes no upload for them, and varied sizes
/// cost one small upload, as before. Bounded, since the sizes are data (one entry
/// per distinct batch of sizes would grow without end on COCO), except that an
/// entry read during a graph capture is kept for the process: the graph reads its
/// buffer on every replay, so it must never be freed and reused.
fn sizes_tensor(image_sizes: &[(usize, usize)], device: Device) -> Result<Tensor> {
    use std::sync::{Mutex, OnceLock};
    const KEEP: usize = 8;
    struct Entry {
        device: Device,
        sizes: Vec<(usize, usize)>,
        table: Tensor,
        /// Read by a captured graph: never evicted.
        pinned: bool,
    }
    static CACHE: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    let upload = || {
        let v: Vec<f32> = image_sizes
            .iter()
            .flat_map(|&(h, w)| [h as f32, w as f32])
            .collect();
        Tensor::from_vec(v, [image_sizes.len(), 2])?.to_device(device)
    };
    let Device::Cuda(ordinal) = device else {
        return upload();
    };
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    // The device handle of a cached tensor must be the current one: an ordinal can
    // be registered again with another backend (tests open emulated devices).
    let current = crate::device::gpu::registered(ordinal);
    let live = |t: &Tensor| match (t.gpu(), &current) {
        (Ok(g), Some(d)) => std::sync::Arc::ptr_eq(&g.dev.backend, &d.backend),
        _ => false,
    };
    let capturing = current.as_ref().is_some_and(|d| d.backend.is_capturing());
    if let Some(k) = c
        .iter()
        .position(|e| e.device == device && e.sizes == image_sizes && live(&e.table))
    {
        let mut hit = c.remove(k);
        hit.pinned |= capturing;
        let t = hit.table.clone();
        c.push(hit);
        return Ok(t);
    }
    // A miss during a capture fails in the upload (a host copy is refused there),
    // naming the op: run the region once eagerly first.
    let t = {
        let _long = crate::device::alloc::long_lived();
        upload()?
    };
    if c.iter().filter(|e| !e.pinned).count() >= KEEP {
        if let Some(k) = c.iter().position(|e| !e.pinned) {
            c.remove(k);
        }
    }
    c.push(Entry {
        device,
        sizes: image_sizes.to_vec(),
        table: t.clone(),
        pinned: capturing,
    });
    Ok(t)
}

/// The deltas and anchors of the top-k columns `idx` `[N, K]`: both `[N * K, 4]`.
fn gather(idx: &Tensor, deltas: &Tensor, anchors: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, k) = (idx.dims()[0], idx.dims()[1]);
    let a = anchors.dims()[0];
    match idx.device() {
        Device::Cpu => {
            let (idx, d, an) = (
                idx.cpu_i64()?,
                deltas.cpu_slice::<f32>()?,
                anchors.cpu_slice::<f32>()?,
            );
            let mut codes = pool::take_empty::<f32>(4 * n * k);
            let mut refs = pool::take_empty::<f32>(4 * n * k);
            for (e, &j) in idx.iter().enumerate() {
                let (img, j) = (e / k.max(1), j as usize);
                codes.extend_from_slice(&d[4 * (img * a + j)..4 * (img * a + j) + 4]);
                refs.extend_from_slice(&an[4 * j..4 * j + 4]);
            }
            Ok((
                Tensor::from_vec(codes, [n * k, 4])?,
                Tensor::from_vec(refs, [n * k, 4])?,
            ))
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("select_proposals", deltas)?;
            let codes = Tensor::gpu_empty(&dev, [n * k, 4])?;
            let refs = Tensor::gpu_empty(&dev, [n * k, 4])?;
            launch_elems(
                &dev,
                "proposals_gather_f32",
                n * k,
                &[
                    idx.gpu()?.buf.arg(),
                    arg(deltas)?,
                    arg(anchors)?,
                    KernelArg::I64(n as i64),
                    KernelArg::I64(k as i64),
                    KernelArg::I64(a as i64),
                    arg(&codes)?,
                    arg(&refs)?,
                ],
            )?;
            Ok((codes, refs))
        }
    }
}

/// torch.clamp(v, 0, hi), NaN passing through.
fn clamp(v: f32, hi: f32) -> f32 {
    let v = if v < 0.0 { 0.0 } else { v };
    if hi < v {
        hi
    } else {
        v
    }
}

/// A box clipped to an image of height `h` and width `w`.
fn clip(b: &[f32], h: f32, w: f32) -> [f32; 4] {
    [
        clamp(b[0], w),
        clamp(b[1], h),
        clamp(b[2], w),
        clamp(b[3], h),
    ]
}

fn big_enough(b: &[f32; 4], min_size: f32) -> bool {
    b[2] - b[0] >= min_size && b[3] - b[1] >= min_size
}

/// RPN candidates from decoded boxes `[N * K, 4]` and their logits `[N, K]`
/// (proposals_filter_f32).
fn filter_proposals(
    decoded: &Tensor,
    logits: &Tensor,
    sizes: &Tensor,
    n: usize,
    k: usize,
    ends: &[usize],
    p: &ProposalParams,
) -> Result<Candidates> {
    let levels = ends.len();
    match decoded.device() {
        Device::Cpu => {
            let (d, l, s) = (
                decoded.cpu_slice::<f32>()?,
                logits.cpu_slice::<f32>()?,
                sizes.cpu_slice::<f32>()?,
            );
            let mut boxes = pool::take_empty::<f32>(4 * n * k);
            let mut scores = pool::take_empty::<f32>(n * k);
            let mut groups = pool::take_empty::<i64>(n * k);
            for e in 0..n * k {
                let (img, j) = (e / k, e % k);
                let level = ends[..levels - 1].iter().filter(|&&end| j >= end).count();
                let b = clip(&d[4 * e..4 * e + 4], s[2 * img], s[2 * img + 1]);
                let score = 1.0 / (1.0 + (-l[e]).exp());
                let ok = big_enough(&b, p.min_size) && score >= p.score_thresh;
                boxes.extend_from_slice(&b);
                scores.push(if ok { score } else { f32::NEG_INFINITY });
                groups.push(if ok {
                    (img * levels + level) as i64
                } else {
                    -1
                });
            }
            Ok(Candidates {
                boxes: Tensor::from_vec(boxes, [n * k, 4])?,
                scores: Tensor::from_vec(scores, [n * k])?,
                groups: Tensor::from_vec_i64(groups, [n * k])?,
            })
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("select_proposals", decoded)?;
            let c = gpu_candidates(&dev, n * k)?;
            let mut args = vec![
                arg(decoded)?,
                arg(logits)?,
                arg(sizes)?,
                KernelArg::I64(n as i64),
                KernelArg::I64(k as i64),
                KernelArg::I32(levels as i32),
            ];
            args.extend(
                (0..MAX_LEVELS).map(|l| KernelArg::I64(ends.get(l).copied().unwrap_or(k) as i64)),
            );
            args.extend([
                KernelArg::F32(p.min_size),
                KernelArg::F32(p.score_thresh),
                arg(&c.boxes)?,
                arg(&c.scores)?,
                c.groups.gpu()?.buf.arg(),
            ]);
            launch_elems(&dev, "proposals_filter_f32", n * k, &args)?;
            Ok(c)
        }
    }
}

/// Box-head candidates `[R * (C - 1)]` (proposals_roi_filter_f32).
fn filter_detections(
    logits: &Tensor,
    decoded: &Tensor,
    row_image: &Tensor,
    sizes: &Tensor,
    p: &DetectionParams,
) -> Result<Candidates> {
    let (r, c) = (logits.dims()[0], logits.dims()[1]);
    let m = r * (c - 1);
    match logits.device() {
        Device::Cpu => {
            let ri = row_image.cpu_i64()?;
            roi_candidates_cpu(logits, decoded, sizes, p, |row| (ri[row] as usize, true))
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("select_detections", logits)?;
            let cand = gpu_candidates(&dev, m)?;
            launch_elems(
                &dev,
                "proposals_roi_filter_f32",
                m,
                &[
                    arg(logits)?,
                    arg(decoded)?,
                    row_image.gpu()?.buf.arg(),
                    arg(sizes)?,
                    KernelArg::I64(r as i64),
                    KernelArg::I64(c as i64),
                    KernelArg::F32(p.score_thresh),
                    KernelArg::F32(p.min_size),
                    arg(&cand.boxes)?,
                    arg(&cand.scores)?,
                    cand.groups.gpu()?.buf.arg(),
                ],
            )?;
            Ok(cand)
        }
    }
}

/// Box-head candidates `[R * (C - 1)]` on the CPU (the twin of
/// proposals_roi_filter_f32 and proposals_roi_filter_padded_f32): `row_of(r)` gives
/// row `r`'s image and whether the row is real (a padding row's candidates are
/// rejected).
fn roi_candidates_cpu(
    logits: &Tensor,
    decoded: &Tensor,
    sizes: &Tensor,
    p: &DetectionParams,
    row_of: impl Fn(usize) -> (usize, bool),
) -> Result<Candidates> {
    let (r, c) = (logits.dims()[0], logits.dims()[1]);
    let m = r * (c - 1);
    let (x, d, s) = (
        logits.cpu_slice::<f32>()?,
        decoded.cpu_slice::<f32>()?,
        sizes.cpu_slice::<f32>()?,
    );
    let mut boxes = Vec::with_capacity(4 * m);
    let mut scores = Vec::with_capacity(m);
    let mut groups = Vec::with_capacity(m);
    for row in 0..r {
        let probs = softmax(&x[row * c..(row + 1) * c]);
        let (img, real) = row_of(row);
        for (j, &prob) in probs.iter().enumerate().skip(1) {
            let o = 4 * (row * c + j);
            let b = clip(&d[o..o + 4], s[2 * img], s[2 * img + 1]);
            let ok = real && prob > p.score_thresh && big_enough(&b, p.min_size);
            boxes.extend_from_slice(&b);
            scores.push(if ok { prob } else { f32::NEG_INFINITY });
            groups.push(if ok { (img * c + j) as i64 } else { -1 });
        }
    }
    Ok(Candidates {
        boxes: Tensor::from_vec(boxes, [m, 4])?,
        scores: Tensor::from_vec(scores, [m])?,
        groups: Tensor::from_vec_i64(groups, [m])?,
    })
}

fn gpu_candidates(dev: &crate::device::gpu::GpuDevice, m: usize) -> Result<Candidates> {
    Ok(Candidates {
        boxes: Tensor::gpu_empty(dev, [m, 4])?,
        scores: Tensor::gpu_empty(dev, [m])?,
        groups: Tensor::gpu_empty_i64(dev, [m])?,
    })
}

/// The CPU detection selection: the same filter, NMS and selection as the device
/// pipeline, but the rejected candidates are dropped before NMS instead of being
/// carried with score `-inf`. With 91 classes and 1000 proposals nearly all of the
/// 90,000 candidates are rejected, and sorting and indexing them was where the
/// CPU's time went (100-350 ms); torchvision drops them too. The kept boxes, their
/// order (descending score, ties by candidate index) and the indices are those of
/// the device pipeline: rejected candidates have group -1, so they never suppress or
/// precede a real one.
/// A candidate that passed the filter: (candidate index, group, score, clipped box).
type Survivor = (i64, i64, f32, [f32; 4]);

fn detections_cpu(
    logits: &Tensor,
    decoded: &Tensor,
    rows_per_image: &[usize],
    image_sizes: &[(usize, usize)],
    p: &DetectionParams,
) -> Result<Selected> {
    use rayon::prelude::*;
    let (r, c) = (logits.dims()[0], logits.dims()[1]);
    let (x, d) = (logits.cpu_slice::<f32>()?, decoded.cpu_slice::<f32>()?);
    let row_image: Vec<usize> = rows_per_image
        .iter()
        .enumerate()
        .flat_map(|(n, &k)| std::iter::repeat_n(n, k))
        .collect();
    // Survivors per row, in candidate order.
    let per_row: Vec<Vec<Survivor>> = (0..r)
        .into_par_iter()
        .map(|row| {
            let probs = softmax(&x[row * c..(row + 1) * c]);
            let img = row_image[row];
            let (h, w) = image_sizes[img];
            let mut out = Vec::new();
            for (j, &prob) in probs.iter().enumerate().skip(1) {
                // NaN probabilities fail this test, as in torchvision.
                if prob.partial_cmp(&p.score_thresh) != Some(std::cmp::Ordering::Greater) {
                    continue;
                }
                let o = 4 * (row * c + j);
                let b = clip(&d[o..o + 4], h as f32, w as f32);
                if big_enough(&b, p.min_size) {
                    let cand = (row * (c - 1) + j - 1) as i64;
                    out.push((cand, (img * c + j) as i64, prob, b));
                }
            }
            out
        })
        .collect();
    let total = per_row.iter().map(Vec::len).sum();
    // The survivors in candidate order, in this thread's vector kept for the next call.
    pool::with_vec::<Survivor, _>(total, |kept| {
        kept.extend(per_row.into_iter().flatten());
        let k = kept.len();
        let mut boxes = pool::take_empty::<f32>(4 * k);
        boxes.extend(kept.iter().flat_map(|e| e.3));
        let mut scores = pool::take_empty::<f32>(k);
        scores.extend(kept.iter().map(|e| e.2));
        let mut groups = pool::take_empty::<i64>(k);
        groups.extend(kept.iter().map(|e| e.1));
        let keep = nms_device(
            &Tensor::from_vec(boxes, [k, 4])?,
            &Tensor::from_vec(scores, [k])?,
            Some(&Tensor::from_vec_i64(groups, [k])?),
            p.nms_thresh,
        )?;
        let count = keep.count.cpu_i64()?[0] as usize;
        let (n, top) = (image_sizes.len(), p.detections_per_img);
        let mut boxes = vec![0f32; n * top * 4];
        let mut scores = vec![0f32; n * top];
        let mut indices = vec![-1i64; n * top];
        let mut counts = vec![0i64; n];
        for &i in &keep.keep.cpu_i64()?[..count] {
            let (cand, group, score, b) = kept[i as usize];
            let img = group as usize / c;
            let pos = counts[img] as usize;
            if pos < top {
                let o = img * top + pos;
                boxes[4 * o..4 * o + 4].copy_from_slice(&b);
                scores[o] = score;
                indices[o] = cand;
                counts[img] += 1;
            }
        }
        Ok(Selected {
            boxes: Tensor::from_vec(boxes, [n, top, 4])?,
            scores: Tensor::from_vec(scores, [n, top])?,
            indices: Tensor::from_vec_i64(indices, [n, top])?,
            counts: Tensor::from_vec_i64(counts, [n])?,
        })
    })
}

/// Softmax of one row in f32 as torch computes it: shifted by the maximum, summed in
/// order.
fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s = e.iter().fold(0.0f32, |s, v| s + v);
    e.iter().map(|v| v / s).collect()
}

/// Each image's first `top` kept candidates (proposals_select_f32).
fn select(
    keep: &NmsOutput,
    c: &Candidates,
    groups_per_image: usize,
    n: usize,
    top: usize,
) -> Result<Selected> {
    match c.boxes.device() {
        Device::Cpu => {
            let count = keep.count.cpu_i64()?[0] as usize;
            let (kp, g) = (&keep.keep.cpu_i64()?[..count], c.groups.cpu_i64()?);
            let (b, s) = (c.boxes.cpu_slice::<f32>()?, c.scores.cpu_slice::<f32>()?);
            let mut boxes = vec![0f32; n * top * 4];
            let mut scores = vec![0f32; n * top];
            let mut indices = vec![-1i64; n * top];
            let mut counts = vec![0i64; n];
            for &i in kp {
                let i = i as usize;
                if g[i] < 0 {
                    continue;
                }
                let img = g[i] as usize / groups_per_image;
                let pos = counts[img] as usize;
                if pos < top {
                    let o = img * top + pos;
                    boxes[4 * o..4 * o + 4].copy_from_slice(&b[4 * i..4 * i + 4]);
                    scores[o] = s[i];
                    indices[o] = i as i64;
                    counts[img] += 1;
                }
            }
            Ok(Selected {
                boxes: Tensor::from_vec(boxes, [n, top, 4])?,
                scores: Tensor::from_vec(scores, [n, top])?,
                indices: Tensor::from_vec_i64(indices, [n, top])?,
                counts: Tensor::from_vec_i64(counts, [n])?,
            })
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("select_proposals", &c.boxes)?;
            let out = Selected {
                boxes: Tensor::gpu_empty(&dev, [n, top, 4])?,
                scores: Tensor::gpu_empty(&dev, [n, top])?,
                indices: Tensor::gpu_empty_i64(&dev, [n, top])?,
                counts: Tensor::gpu_empty_i64(&dev, [n])?,
            };
            // No images, no candidates (every level empty) or no rows to fill: the
            // zero-filled result is the answer, and a launch would get empty buffers.
            if n == 0 || top == 0 || c.groups.numel() == 0 {
                // Indices pad with -1, as the kernel writes them (an upload, no read).
                let indices = Tensor::from_vec_i64(vec![-1; n * top], [n, top])?
                    .to_device(c.boxes.device())?;
                return Ok(Selected {
                    boxes: Tensor::gpu_zeros(&dev, [n, top, 4])?,
                    scores: Tensor::gpu_zeros(&dev, [n, top])?,
                    indices,
                    counts: Tensor::gpu_zeros_i64(&dev, [n])?,
                });
            }
            dev.launch(
                "proposals_select_f32",
                LaunchCfg {
                    grid: (n as u32, 1, 1),
                    block: (256, 1, 1),
                    shared_bytes: 0,
                },
                &[
                    keep.keep.gpu()?.buf.arg(),
                    keep.count.gpu()?.buf.arg(),
                    c.groups.gpu()?.buf.arg(),
                    KernelArg::I64(groups_per_image as i64),
                    arg(&c.boxes)?,
                    arg(&c.scores)?,
                    KernelArg::I64(top as i64),
                    arg(&out.boxes)?,
                    arg(&out.scores)?,
                    out.indices.gpu()?.buf.arg(),
                    out.counts.gpu()?.buf.arg(),
                ],
            )?;
            Ok(out)
        }
    }
}
