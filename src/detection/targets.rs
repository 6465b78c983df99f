//! Training targets of a batch selected where the tensors live (torchvision's
//! `Matcher`, `BalancedPositiveNegativeSampler` and `select_training_samples`), every
//! image of the batch in one launch per stage and nothing read back to the host: the
//! CUDA kernels are kernels/sampling.cu, and the CPU twins here run the same
//! algorithm so that both pick exactly the same anchors and RoIs.
//!
//! Sampling draws no sequence: candidate `j` of image `n` at a stage gets the Philox
//! key [`philox_sample_key`]`(seed, n, stage, j)`, and a class with more members than
//! wanted keeps the `k` members of smallest `(key, j)` — a uniform draw of `k`
//! without replacement that depends on nothing but the step's seed, so it is the same
//! on any device, in any launch order, and after a resume. A class with at most as
//! many members as wanted is taken whole (the fixtures' batch of 10^6 takes
//! everything, so torchvision's own picks are reproduced).
//!
//! Sizes never depend on the data: the RPN stage works on dense per-anchor weights,
//! the RoI stage on `cap = min(batch_size_per_image, slots)` rows per image with the
//! real count on the device; the loss normalisers (sampled anchors, sampled RoIs)
//! are folded into the per-row weights on the device.

use super::matcher::Matcher;
use super::Target;
use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, launch_elems};
use crate::rng::philox_sample_key;
use crate::tensor::{pool, Tensor};

/// Stage number in the Philox counter: RPN anchors.
pub const STAGE_RPN: u32 = 0;
/// Stage number in the Philox counter: RoIs of the box head.
pub const STAGE_ROI: u32 = 1;

/// Unit box standing in for "no candidate": it encodes to zeros against itself.
const UNIT: [f32; 4] = [0.0, 0.0, 1.0, 1.0];

/// The ground truth of a batch in one f32 tensor, uploaded in one copy: boxes
/// `[G, 4]`, labels `[G]`, image offsets `[N + 1]` (integers below 2^24, exact in f32).
pub struct PackedTargets {
    /// `[5 G + N + 1]` f32 on the batch's device.
    pub data: Tensor,
    /// Images in the batch.
    pub images: usize,
    /// Boxes in the batch.
    pub boxes: usize,
    /// Most boxes of one image.
    pub max_boxes: usize,
}

impl PackedTargets {
    /// Pack `targets` and move them to `device` (one host-to-device copy).
    pub fn new(targets: &[Target], device: Device) -> Result<PackedTargets> {
        let g: usize = targets.iter().map(|t| t.boxes.len()).sum();
        // f32 holds integers exactly up to 2^24.
        if g >= 1 << 24 {
            return Err(Error::invalid(
                "PackedTargets",
                format!("{g} boxes in one batch"),
            ));
        }
        let mut data = Vec::with_capacity(5 * g + targets.len() + 1);
        for t in targets {
            if t.labels.len() != t.boxes.len() {
                return Err(Error::invalid(
                    "PackedTargets",
                    format!("{} boxes and {} labels", t.boxes.len(), t.labels.len()),
                ));
            }
            data.extend(t.boxes.iter().flatten().copied());
        }
        for t in targets {
            for &l in &t.labels {
                if !(0..1 << 24).contains(&l) {
                    return Err(Error::invalid("PackedTargets", format!("label {l}")));
                }
                data.push(l as f32);
            }
        }
        let mut off = 0usize;
        data.push(0.0);
        for t in targets {
            off += t.boxes.len();
            data.push(off as f32);
        }
        let n = data.len();
        Ok(PackedTargets {
            data: Tensor::from_vec(data, [n])?.to_device(device)?,
            images: targets.len(),
            boxes: g,
            max_boxes: targets.iter().map(|t| t.boxes.len()).max().unwrap_or(0),
        })
    }

    fn host(&self) -> Result<HostTargets<'_>> {
        let d = self.data.cpu_slice::<f32>()?;
        let g = self.boxes;
        Ok(HostTargets {
            boxes: &d[..4 * g],
            labels: &d[4 * g..5 * g],
            offsets: &d[5 * g..],
        })
    }
}

struct HostTargets<'a> {
    boxes: &'a [f32],
    labels: &'a [f32],
    offsets: &'a [f32],
}

impl HostTargets<'_> {
    fn range(&self, n: usize) -> (usize, usize) {
        (self.offsets[n] as usize, self.offsets[n + 1] as usize)
    }
    fn bx(&self, g: usize) -> &[f32] {
        &self.boxes[4 * g..4 * g + 4]
    }
}

/// Candidate slots of each image: `slots` boxes at `boxes + n * stride` (stride 0:
/// anchors shared by all images), the first `counts[n]` real when `counts` is given,
/// then with `append_gt` the image's gt boxes (torchvision appends them to the
/// proposals).
pub struct Candidates<'a> {
    /// Candidate boxes (f32, rows of 4).
    pub boxes: &'a Tensor,
    /// f32 elements between images (0: shared).
    pub stride: usize,
    /// `[N]` i64 real candidates per image; `None`: all `slots`.
    pub counts: Option<&'a Tensor>,
    /// Candidate slots per image before the appended gt.
    pub slots: usize,
    /// Append each image's gt boxes as candidates.
    pub append_gt: bool,
}

impl Candidates<'_> {
    /// Slots per image: `slots` plus the most gt boxes of an image if appended.
    pub fn len(&self, tg: &PackedTargets) -> usize {
        self.slots + if self.append_gt { tg.max_boxes } else { 0 }
    }
    /// No slot at all.
    pub fn is_empty(&self, tg: &PackedTargets) -> bool {
        self.len(tg) == 0
    }
}

/// Per slot `[N * L]` (i64): the label (see [`match_labels`]) and the gt index the
/// targets use.
pub struct Matched {
    /// Labels: RPN 1 / 0 / -1, RoI the class / 0 / -1; -1 for empty slots.
    pub labels: Tensor,
    /// Global gt index: the best gt of foreground, the image's first gt otherwise
    /// (torchvision's clamp), -1 without gt.
    pub matched: Tensor,
}

/// Whether labels are objectness (RPN) or classes (RoI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelMode {
    /// 1 foreground, 0 background, -1 between the thresholds.
    Objectness,
    /// The matched gt's class, 0 background, -1 between the thresholds.
    Class,
}

fn box_iou1(p: &[f32], q: &[f32]) -> f32 {
    // box_iou's operation order (kernels/boxes.cu box_iou_f32).
    let nan_max = |a: f32, b: f32| {
        if a.is_nan() {
            a
        } else if b.is_nan() {
            b
        } else if a > b {
            a
        } else {
            b
        }
    };
    let nan_min = |a: f32, b: f32| {
        if a.is_nan() {
            a
        } else if b.is_nan() {
            b
        } else if a < b {
            a
        } else {
            b
        }
    };
    let area1 = (p[2] - p[0]) * (p[3] - p[1]);
    let area2 = (q[2] - q[0]) * (q[3] - q[1]);
    let (ltx, lty) = (nan_max(p[0], q[0]), nan_max(p[1], q[1]));
    let (rbx, rby) = (nan_min(p[2], q[2]), nan_min(p[3], q[3]));
    let (mut w, mut h) = (rbx - ltx, rby - lty);
    if w < 0.0 {
        w = 0.0;
    }
    if h < 0.0 {
        h = 0.0;
    }
    let inter = w * h;
    inter / (area1 + area2 - inter)
}

fn nan_max_first(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        a
    } else if b.is_nan() || a < b {
        b
    } else {
        a
    }
}

struct HostCands<'a> {
    boxes: &'a [f32],
    stride: usize,
    counts: Option<Vec<i64>>,
    slots: usize,
    append_gt: bool,
}

impl HostCands<'_> {
    fn get<'b>(&'b self, tg: &'b HostTargets<'b>, n: usize, j: usize) -> Option<&'b [f32]> {
        if j < self.slots {
            if let Some(c) = &self.counts {
                if j as i64 >= c[n] {
                    return None;
                }
            }
            let o = n * self.stride + 4 * j;
            return Some(&self.boxes[o..o + 4]);
        }
        let (g0, g1) = tg.range(n);
        (self.append_gt && j - self.slots < g1 - g0).then(|| tg.bx(g0 + j - self.slots))
    }
}

fn host_cands<'a>(c: &Candidates<'a>) -> Result<HostCands<'a>> {
    Ok(HostCands {
        boxes: c.boxes.cpu_slice::<f32>()?,
        stride: c.stride,
        counts: c.counts.map(|t| t.to_vec_i64()).transpose()?,
        slots: c.slots,
        append_gt: c.append_gt,
    })
}

fn cand_args(c: &Candidates<'_>) -> Result<[KernelArg; 6]> {
    Ok([
        arg(c.boxes)?,
        KernelArg::I64(c.stride as i64),
        // Without counts the kernel never reads this pointer; any buffer will do.
        arg(c.counts.unwrap_or(c.boxes))?,
        KernelArg::I32(c.counts.is_some() as i32),
        KernelArg::I64(c.slots as i64),
        KernelArg::I32(c.append_gt as i32),
    ])
}

fn block_launch(dev: &GpuDevice, kernel: &str, blocks: usize, args: &[KernelArg]) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    dev.launch(
        kernel,
        LaunchCfg {
            grid: (blocks as u32, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        },
        args,
    )
}

/// Slots per parallel chunk of the CPU matching.
const MATCH_CHUNK: usize = 4096;

/// One chunk of one image's slots after the IoU sweep: per slot the first best gt
/// (image-local) and its IoU, and per gt of the image the chunk's maximum IoU and
/// the slots that reach it.
struct ChunkSweep {
    best: Vec<(f32, u32)>,
    gt_max: Vec<f32>,
    gt_ties: Vec<Vec<u32>>,
}

/// The CPU twin of `sample_gt_max_f32` + `sample_match_f32` for one image, each IoU
/// computed once: one sweep over the slots (in parallel chunks) gives every slot's
/// best gt and every gt's maximum with the slots that reach it, so the low-quality
/// rule needs no second pass over the IoUs. Writes the image's `labels` and
/// `matched` rows (`[L]` each).
#[allow(clippy::too_many_arguments)]
fn match_image_cpu(
    t: &HostTargets<'_>,
    c: &HostCands<'_>,
    img: usize,
    matcher: &Matcher,
    (high, low): (f32, f32),
    mode: LabelMode,
    labels: &mut [i64],
    matched: &mut [i64],
) {
    use rayon::prelude::*;
    let l = labels.len();
    let (g0, g1) = t.range(img);
    let g = g1 - g0;
    if g == 0 {
        for (j, lab) in labels.iter_mut().enumerate() {
            // No gt: every real slot is background, matched to nothing.
            *lab = if c.get(t, img, j).is_some() { 0 } else { -1 };
        }
        matched.fill(-1);
        return;
    }
    let sweep = |ch: usize| -> ChunkSweep {
        let (j0, j1) = (ch * MATCH_CHUNK, ((ch + 1) * MATCH_CHUNK).min(l));
        let mut best = Vec::with_capacity(j1 - j0);
        let mut gt_max = vec![f32::NEG_INFINITY; g];
        let mut gt_ties = vec![Vec::new(); g];
        let mut iou = vec![0f32; g];
        for j in j0..j1 {
            let Some(q) = c.get(t, img, j) else {
                best.push((f32::NAN, u32::MAX));
                continue;
            };
            for (r, v) in iou.iter_mut().enumerate() {
                *v = box_iou1(t.bx(g0 + r), q);
            }
            // torch's max(dim=0): the first maximum, a NaN counting as the maximum.
            let (mut b, mut arg) = (iou[0], 0usize);
            for (r, &v) in iou.iter().enumerate() {
                if v > b || v.is_nan() || b.is_nan() {
                    b = v;
                    arg = r;
                    if v.is_nan() {
                        break;
                    }
                }
            }
            best.push((b, arg as u32));
            if matcher.allow_low_quality_matches {
                for r in 0..g {
                    let (v, m) = (iou[r], gt_max[r]);
                    if !m.is_nan() && (v.is_nan() || m < v) {
                        gt_ties[r].clear();
                    }
                    gt_max[r] = nan_max_first(m, v);
                    // Ties at a maximum of 0 (a gt clear of every slot of the chunk)
                    // are not listed: found again below in the rare case they count.
                    if v == gt_max[r] && v > 0.0 {
                        gt_ties[r].push(j as u32);
                    }
                }
            }
        }
        ChunkSweep {
            best,
            gt_max,
            gt_ties,
        }
    };
    let chunks: Vec<ChunkSweep> = (0..l.div_ceil(MATCH_CHUNK))
        .into_par_iter()
        .map(sweep)
        .collect();
    // Each gt's maximum over all slots, folded in slot order as the kernel does.
    let mut low_quality = vec![
        false;
        if matcher.allow_low_quality_matches {
            l
        } else {
            0
        }
    ];
    if matcher.allow_low_quality_matches {
        for r in 0..g {
            let m = chunks
                .iter()
                .fold(f32::NEG_INFINITY, |m, ch| nan_max_first(m, ch.gt_max[r]));
            if m.is_nan() || m <= 0.0 {
                // A maximum of 0 or less (or NaN, which equals nothing): no list.
                for (j, lq) in low_quality.iter_mut().enumerate() {
                    if let Some(q) = c.get(t, img, j) {
                        *lq |= box_iou1(t.bx(g0 + r), q) == m;
                    }
                }
                continue;
            }
            // A slot equals the maximum only in a chunk whose own maximum equals it.
            for ch in chunks.iter().filter(|ch| ch.gt_max[r] == m) {
                for &j in &ch.gt_ties[r] {
                    low_quality[j as usize] = true;
                }
            }
        }
    }
    for (j, &(b, arg)) in chunks.iter().flat_map(|ch| &ch.best).enumerate() {
        if arg == u32::MAX {
            labels[j] = -1;
            matched[j] = -1;
            continue;
        }
        let mut m = arg as i64;
        if b < low {
            m = -1;
        } else if b >= low && b < high {
            m = -2;
        }
        if matcher.allow_low_quality_matches && low_quality[j] {
            m = arg as i64;
        }
        labels[j] = match (m, mode) {
            (m, LabelMode::Objectness) if m >= 0 => 1,
            (m, LabelMode::Class) if m >= 0 => t.labels[g0 + m as usize] as i64,
            (-1, _) => 0,
            _ => -1,
        };
        matched[j] = (g0 as i64) + m.max(0);
    }
}

/// Match every candidate slot of every image to its image's gt with `matcher`'s
/// rules (torchvision's `Matcher`, low-quality matches included) and label it.
pub fn match_labels(
    tg: &PackedTargets,
    cands: &Candidates<'_>,
    matcher: &Matcher,
    mode: LabelMode,
) -> Result<Matched> {
    let (n, l) = (tg.images, cands.len(tg));
    let (high, low) = (matcher.high_threshold as f32, matcher.low_threshold as f32);
    match tg.data.device() {
        Device::Cpu => {
            let t = tg.host()?;
            let c = host_cands(cands)?;
            let (mut labels, mut matched) = (pool::take::<i64>(n * l), pool::take::<i64>(n * l));
            labels.fill(-1);
            matched.fill(-1);
            if l > 0 {
                for (img, (lab, mt)) in labels.chunks_mut(l).zip(matched.chunks_mut(l)).enumerate()
                {
                    match_image_cpu(&t, &c, img, matcher, (high, low), mode, lab, mt);
                }
            }
            Ok(Matched {
                labels: Tensor::from_vec_i64(labels, [n * l])?,
                matched: Tensor::from_vec_i64(matched, [n * l])?,
            })
        }
        Device::Cuda(_) => {
            let dev = tg.data.gpu()?.dev.clone();
            let rowmax = Tensor::gpu_empty(&dev, [tg.boxes.max(1)])?;
            let head = [
                arg(&tg.data)?,
                KernelArg::I64(tg.boxes as i64),
                KernelArg::I64(n as i64),
            ];
            let ca = cand_args(cands)?;
            if matcher.allow_low_quality_matches {
                let mut a = head.to_vec();
                a.extend(ca);
                a.extend([KernelArg::I64(l as i64), arg(&rowmax)?]);
                block_launch(&dev, "sample_gt_max_f32", tg.boxes, &a)?;
            }
            let labels = Tensor::gpu_empty_i64(&dev, [n * l])?;
            let matched = Tensor::gpu_empty_i64(&dev, [n * l])?;
            let mut a = head.to_vec();
            a.extend(ca);
            a.extend([
                KernelArg::I64(l as i64),
                arg(&rowmax)?,
                KernelArg::F32(high),
                KernelArg::F32(low),
                KernelArg::I32(matcher.allow_low_quality_matches as i32),
                KernelArg::I32((mode == LabelMode::Class) as i32),
                labels.gpu()?.buf.arg(),
                matched.gpu()?.buf.arg(),
            ]);
            launch_elems(&dev, "sample_match_f32", n * l, &a)?;
            Ok(Matched { labels, matched })
        }
    }
}

/// Balanced sampling settings: `want_pos = floor(batch * positive_fraction)` (Python's
/// `int(batch * fraction)`), `batch` in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleSpec {
    /// Positives wanted per image.
    pub want_pos: usize,
    /// Samples per image in all.
    pub batch: usize,
}

impl SampleSpec {
    /// From torchvision's two settings; errors unless the fraction is in [0, 1].
    pub fn new(batch_size_per_image: usize, positive_fraction: f64) -> Result<SampleSpec> {
        if !(0.0..=1.0).contains(&positive_fraction) {
            return Err(Error::invalid(
                "sampler",
                format!("positive_fraction {positive_fraction} is not in [0, 1]"),
            ));
        }
        Ok(SampleSpec {
            want_pos: (batch_size_per_image as f64 * positive_fraction) as usize,
            batch: batch_size_per_image,
        })
    }
}

/// Sample each image's labels `[N * L]`: `sel` `[N * L]` i64 (1 sampled positive, 0
/// sampled negative, -1 not) and `counts` `[2 N]` i64 (positives, negatives taken).
pub fn sample(
    labels: &Tensor,
    images: usize,
    spec: SampleSpec,
    seed: u64,
    stage: u32,
) -> Result<(Tensor, Tensor)> {
    let l = labels.numel().checked_div(images).unwrap_or(0);
    if l * images != labels.numel() || l > u32::MAX as usize {
        return Err(Error::shape(
            "sampler",
            format!("{} labels for {images} images", labels.numel()),
        ));
    }
    match labels.device() {
        Device::Cpu => {
            let lab = labels.cpu_i64()?;
            let mut sel = pool::take::<i64>(images * l);
            sel.fill(-1);
            let mut counts = vec![0i64; 2 * images];
            for n in 0..images {
                let row = &lab[n * l..(n + 1) * l];
                let mut taken_pos = 0;
                for cls in 0..2 {
                    let want = if cls == 0 {
                        spec.want_pos
                    } else {
                        spec.batch - taken_pos
                    };
                    let k = pool::with_vec::<usize, _>(l, |members| {
                        members.extend((0..l).filter(|&j| {
                            if cls == 0 {
                                row[j] >= 1
                            } else {
                                row[j] == 0
                            }
                        }));
                        let k = want.min(members.len());
                        if k < members.len() {
                            smallest_keys(members, k, |j| {
                                philox_sample_key(seed, n as u32, stage, j as u32)
                            });
                        }
                        for &j in &members[..k] {
                            sel[n * l + j] = 1 - cls as i64;
                        }
                        k
                    });
                    if cls == 0 {
                        taken_pos = k;
                    }
                    counts[2 * n + cls] = k as i64;
                }
            }
            Ok((
                Tensor::from_vec_i64(sel, [images * l])?,
                Tensor::from_vec_i64(counts, [2 * images])?,
            ))
        }
        Device::Cuda(_) => {
            let dev = labels.gpu()?.dev.clone();
            let sel = Tensor::gpu_empty_i64(&dev, [images * l])?;
            let counts = Tensor::gpu_empty_i64(&dev, [2 * images])?;
            block_launch(
                &dev,
                "sample_balanced",
                images,
                &[
                    labels.gpu()?.buf.arg(),
                    KernelArg::I64(l as i64),
                    KernelArg::I64(spec.want_pos as i64),
                    KernelArg::I64(spec.batch as i64),
                    KernelArg::I64(seed as i64),
                    KernelArg::I32(stage as i32),
                    sel.gpu()?.buf.arg(),
                    counts.gpu()?.buf.arg(),
                ],
            )?;
            Ok((sel, counts))
        }
    }
}

/// Moves the `k` members of smallest `(key(j), j)` (`k` < `members.len()`) to the
/// front of `members`, in no particular order: the keys in parallel, then a
/// selection instead of a sort (the pairs are distinct, so the set is the sorted
/// prefix's).
fn smallest_keys(members: &mut [usize], k: usize, key: impl Fn(usize) -> u32 + Sync) {
    use rayon::prelude::*;
    if k == 0 {
        return;
    }
    // The keyed pairs live in a per-thread vector reused across calls.
    pool::with_vec::<(u32, usize), _>(members.len(), |keyed| {
        keyed.par_extend(members.par_iter().with_min_len(4096).map(|&j| (key(j), j)));
        keyed.select_nth_unstable(k - 1);
        for (m, &(_, j)) in members.iter_mut().zip(&keyed[..k]) {
            *m = j;
        }
    });
}

/// What the RPN losses read, per anchor of the batch `[N * A]`.
pub struct RpnSampleTargets {
    /// Objectness target (1 sampled positive, else 0) `[N A]`.
    pub objectness: Tensor,
    /// BCE weight: 1 / (anchors sampled in the batch) on sampled anchors `[N A]`.
    pub objectness_weight: Tensor,
    /// Box-loss weight `[N A, 4]`: the same on positives.
    pub box_weight: Tensor,
    /// Matched gt box of positives, a unit box elsewhere `[N A, 4]`.
    pub gt_boxes: Tensor,
    /// The anchor of positives, the same unit box elsewhere `[N A, 4]`.
    pub anchor_boxes: Tensor,
}

/// The RPN losses' inputs from the sampler's `sel` and `counts` (see
/// [`RpnSampleTargets`]). With no anchor sampled in the batch the weights are 0.
pub fn rpn_targets(
    tg: &PackedTargets,
    anchors: &Tensor,
    sel: &Tensor,
    matched: &Tensor,
    counts: &Tensor,
) -> Result<RpnSampleTargets> {
    let (n, a) = (tg.images, anchors.dims()[0]);
    match tg.data.device() {
        Device::Cpu => {
            let t = tg.host()?;
            let anc = anchors.cpu_slice::<f32>()?;
            let (s, m) = (sel.cpu_i64()?, matched.cpu_i64()?);
            let total: i64 = counts.cpu_i64()?.iter().sum();
            let w = if total > 0 { 1.0 / total as f32 } else { 0.0 };
            let mut y = vec![0f32; n * a];
            let mut wo = vec![0f32; n * a];
            let mut wb = vec![0f32; 4 * n * a];
            let mut gt = Vec::with_capacity(4 * n * a);
            let mut ab = Vec::with_capacity(4 * n * a);
            for e in 0..n * a {
                let pos = s[e] == 1;
                y[e] = pos as u8 as f32;
                wo[e] = if s[e] >= 0 { w } else { 0.0 };
                if pos {
                    wb[4 * e..4 * e + 4].fill(w);
                    gt.extend_from_slice(t.bx(m[e] as usize));
                    ab.extend_from_slice(&anc[4 * (e % a)..4 * (e % a) + 4]);
                } else {
                    gt.extend_from_slice(&UNIT);
                    ab.extend_from_slice(&UNIT);
                }
            }
            Ok(RpnSampleTargets {
                objectness: Tensor::from_vec(y, [n * a])?,
                objectness_weight: Tensor::from_vec(wo, [n * a])?,
                box_weight: Tensor::from_vec(wb, [n * a, 4])?,
                gt_boxes: Tensor::from_vec(gt, [n * a, 4])?,
                anchor_boxes: Tensor::from_vec(ab, [n * a, 4])?,
            })
        }
        Device::Cuda(_) => {
            let dev = tg.data.gpu()?.dev.clone();
            let y = Tensor::gpu_empty(&dev, [n * a])?;
            let wo = Tensor::gpu_empty(&dev, [n * a])?;
            let wb = Tensor::gpu_empty(&dev, [n * a, 4])?;
            let gt = Tensor::gpu_empty(&dev, [n * a, 4])?;
            let ab = Tensor::gpu_empty(&dev, [n * a, 4])?;
            launch_elems(
                &dev,
                "sample_rpn_targets_f32",
                n * a,
                &[
                    arg(&tg.data)?,
                    KernelArg::I64(n as i64),
                    KernelArg::I64(a as i64),
                    arg(anchors)?,
                    sel.gpu()?.buf.arg(),
                    matched.gpu()?.buf.arg(),
                    counts.gpu()?.buf.arg(),
                    arg(&y)?,
                    arg(&wo)?,
                    arg(&wb)?,
                    arg(&gt)?,
                    arg(&ab)?,
                ],
            )?;
            Ok(RpnSampleTargets {
                objectness: y,
                objectness_weight: wo,
                box_weight: wb,
                gt_boxes: gt,
                anchor_boxes: ab,
            })
        }
    }
}

/// The sampled RoIs of a batch packed into `cap` rows per image, in candidate order.
pub struct RoiGathered {
    /// `[N cap, 4]` sampled boxes; unit boxes past each image's count.
    pub rois: Tensor,
    /// `[N cap, 4]` matched gt box (zeros without gt); unit boxes past the count.
    pub gt_boxes: Tensor,
    /// `[N cap]` i64 class labels (0 past the count).
    pub labels: Tensor,
    /// `[N]` i64 sampled RoIs per image.
    pub counts: Tensor,
}

/// Pack the sampled slots (`sel >= 0`) of each image into `cap` rows.
pub fn roi_gather(
    tg: &PackedTargets,
    cands: &Candidates<'_>,
    sel: &Tensor,
    m: &Matched,
    cap: usize,
) -> Result<RoiGathered> {
    let (n, l) = (tg.images, cands.len(tg));
    match tg.data.device() {
        Device::Cpu => {
            let t = tg.host()?;
            let c = host_cands(cands)?;
            let (s, lab, mt) = (sel.cpu_i64()?, m.labels.cpu_i64()?, m.matched.cpu_i64()?);
            let mut rois = Vec::with_capacity(4 * n * cap);
            let mut gt = Vec::with_capacity(4 * n * cap);
            let mut labels = Vec::with_capacity(n * cap);
            let mut counts = Vec::with_capacity(n);
            for img in 0..n {
                let mut k = 0;
                for j in (0..l).filter(|&j| s[img * l + j] >= 0).take(cap) {
                    let e = img * l + j;
                    // Invariant: the sampler only picks labelled (real) slots.
                    let q = c.get(&t, img, j).ok_or_else(|| {
                        Error::invalid("roi_gather", "a sampled slot holds no candidate")
                    })?;
                    rois.extend_from_slice(q);
                    match mt[e] {
                        g if g >= 0 => gt.extend_from_slice(t.bx(g as usize)),
                        _ => gt.extend_from_slice(&[0.0; 4]),
                    }
                    labels.push(lab[e]);
                    k += 1;
                }
                // Padding rows: a unit box twice, label 0.
                rois.extend(UNIT.repeat(cap - k));
                gt.extend(UNIT.repeat(cap - k));
                labels.resize(labels.len() + cap - k, 0);
                counts.push(k as i64);
            }
            Ok(RoiGathered {
                rois: Tensor::from_vec(rois, [n * cap, 4])?,
                gt_boxes: Tensor::from_vec(gt, [n * cap, 4])?,
                labels: Tensor::from_vec_i64(labels, [n * cap])?,
                counts: Tensor::from_vec_i64(counts, [n])?,
            })
        }
        Device::Cuda(_) => {
            let dev = tg.data.gpu()?.dev.clone();
            let rois = Tensor::gpu_empty(&dev, [n * cap, 4])?;
            let gt = Tensor::gpu_empty(&dev, [n * cap, 4])?;
            let labels = Tensor::gpu_empty_i64(&dev, [n * cap])?;
            let counts = Tensor::gpu_empty_i64(&dev, [n])?;
            let counts_in = cands.counts.ok_or_else(|| {
                Error::invalid("roi_gather", "RoI candidates need per-image counts")
            })?;
            block_launch(
                &dev,
                "sample_roi_gather_f32",
                n,
                &[
                    arg(&tg.data)?,
                    KernelArg::I64(tg.boxes as i64),
                    arg(cands.boxes)?,
                    KernelArg::I64(cands.stride as i64),
                    counts_in.gpu()?.buf.arg(),
                    KernelArg::I64(cands.slots as i64),
                    KernelArg::I64(l as i64),
                    KernelArg::I64(cap as i64),
                    sel.gpu()?.buf.arg(),
                    m.labels.gpu()?.buf.arg(),
                    m.matched.gpu()?.buf.arg(),
                    arg(&rois)?,
                    arg(&gt)?,
                    labels.gpu()?.buf.arg(),
                    counts.gpu()?.buf.arg(),
                ],
            )?;
            Ok(RoiGathered {
                rois,
                gt_boxes: gt,
                labels,
                counts,
            })
        }
    }
}

/// What the box-head losses read, per row of `[N cap]`.
pub struct RoiLossInputs {
    /// Cross-entropy weight 1 / (RoIs sampled in the batch) on real rows `[N cap]`.
    pub class_weight: Tensor,
    /// Row `e * C + label` of the `[N cap C, 4]` regression `[N cap]` i64.
    pub rows: Tensor,
    /// Box-loss weight on foreground rows `[N cap, 4]`.
    pub box_weight: Tensor,
    /// Regression target on foreground rows, zeros elsewhere `[N cap, 4]`.
    pub box_target: Tensor,
}

/// The box-head loss inputs from the gathered rows and their encoded `targets`.
pub fn roi_loss_inputs(
    g: &RoiGathered,
    targets: &Tensor,
    images: usize,
    cap: usize,
    num_classes: usize,
) -> Result<RoiLossInputs> {
    let rows_n = images * cap;
    match targets.device() {
        Device::Cpu => {
            let ns = g.counts.cpu_i64()?;
            let lab = g.labels.cpu_i64()?;
            let tg = targets.cpu_slice::<f32>()?;
            let total: i64 = ns.iter().sum();
            let w = if total > 0 { 1.0 / total as f32 } else { 0.0 };
            let mut wc = vec![0f32; rows_n];
            let mut rows = vec![0i64; rows_n];
            let mut wb = vec![0f32; 4 * rows_n];
            let mut lt = vec![0f32; 4 * rows_n];
            for e in 0..rows_n {
                let real = ((e % cap) as i64) < ns[e / cap];
                let fg = real && lab[e] > 0;
                wc[e] = if real { w } else { 0.0 };
                rows[e] = (e * num_classes) as i64 + lab[e];
                if fg {
                    wb[4 * e..4 * e + 4].fill(w);
                    lt[4 * e..4 * e + 4].copy_from_slice(&tg[4 * e..4 * e + 4]);
                }
            }
            Ok(RoiLossInputs {
                class_weight: Tensor::from_vec(wc, [rows_n])?,
                rows: Tensor::from_vec_i64(rows, [rows_n])?,
                box_weight: Tensor::from_vec(wb, [rows_n, 4])?,
                box_target: Tensor::from_vec(lt, [rows_n, 4])?,
            })
        }
        Device::Cuda(_) => {
            let dev = targets.gpu()?.dev.clone();
            let wc = Tensor::gpu_empty(&dev, [rows_n])?;
            let rows = Tensor::gpu_empty_i64(&dev, [rows_n])?;
            let wb = Tensor::gpu_empty(&dev, [rows_n, 4])?;
            let lt = Tensor::gpu_empty(&dev, [rows_n, 4])?;
            launch_elems(
                &dev,
                "sample_roi_weights_f32",
                rows_n,
                &[
                    KernelArg::I64(images as i64),
                    KernelArg::I64(cap as i64),
                    KernelArg::I64(num_classes as i64),
                    g.counts.gpu()?.buf.arg(),
                    g.labels.gpu()?.buf.arg(),
                    arg(targets)?,
                    arg(&wc)?,
                    rows.gpu()?.buf.arg(),
                    arg(&wb)?,
                    arg(&lt)?,
                ],
            )?;
            Ok(RoiLossInputs {
                class_weight: wc,
                rows,
                box_weight: wb,
                box_target: lt,
            })
        }
    }
}
