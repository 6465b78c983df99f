//! Host-side reference versions of the discrete steps of Faster R-CNN (anchors, box
//! coding, matching, sampling, top-k), torchvision's semantics, on `f32` slices.
//! The model uses these for its first, CPU-exact path; the device kernels of the
//! detection ops replace them where available.

use crate::rng::Rng;

/// torchvision's `AnchorGenerator.generate_anchors`: `round([-w, -h, w, h] / 2)` for
/// each ratio (h/w) at one size, ratios outer.
pub fn base_anchors(size: f32, ratios: &[f32]) -> Vec<[f32; 4]> {
    ratios
        .iter()
        .map(|&r| {
            let hr = r.sqrt();
            let wr = 1.0 / hr;
            let (ws, hs) = (wr * size, hr * size);
            [
                (-ws / 2.0).round(),
                (-hs / 2.0).round(),
                (ws / 2.0).round(),
                (hs / 2.0).round(),
            ]
        })
        .collect()
}

/// Anchors of every level, concatenated level by level, in torchvision's order
/// (row, column, then base anchor). `grids` are feature sizes (h, w); `image` the
/// padded batch size (h, w); the stride is `image / grid` per axis (integer division).
pub fn grid_anchors(
    image: (usize, usize),
    grids: &[(usize, usize)],
    sizes: &[f32],
    ratios: &[f32],
) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (&(gh, gw), &size) in grids.iter().zip(sizes) {
        let base = base_anchors(size, ratios);
        let (sh, sw) = ((image.0 / gh) as f32, (image.1 / gw) as f32);
        for y in 0..gh {
            for x in 0..gw {
                let (cx, cy) = (x as f32 * sw, y as f32 * sh);
                for b in &base {
                    out.push([cx + b[0], cy + b[1], cx + b[2], cy + b[3]]);
                }
            }
        }
    }
    out
}

/// Box coder weights and the clamp on dw, dh (log(1000/16)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxCoder {
    pub weights: [f32; 4],
    pub clip: f32,
}

impl BoxCoder {
    /// A coder with `weights` and torchvision's clamp.
    pub fn new(weights: [f32; 4]) -> Self {
        BoxCoder {
            weights,
            clip: (1000.0f64 / 16.0).ln() as f32,
        }
    }

    /// Deltas that turn `proposal` into `gt` (torchvision's `encode_boxes`).
    pub fn encode(&self, gt: &[f32; 4], proposal: &[f32; 4]) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let (ew, eh) = (proposal[2] - proposal[0], proposal[3] - proposal[1]);
        let (ex, ey) = (proposal[0] + 0.5 * ew, proposal[1] + 0.5 * eh);
        let (gw, gh) = (gt[2] - gt[0], gt[3] - gt[1]);
        let (gx, gy) = (gt[0] + 0.5 * gw, gt[1] + 0.5 * gh);
        [
            wx * (gx - ex) / ew,
            wy * (gy - ey) / eh,
            ww * (gw / ew).ln(),
            wh * (gh / eh).ln(),
        ]
    }

    /// Box from `deltas` applied to `reference` (torchvision's `decode_single`).
    pub fn decode(&self, deltas: &[f32], reference: &[f32; 4]) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let (w, h) = (reference[2] - reference[0], reference[3] - reference[1]);
        let (cx, cy) = (reference[0] + 0.5 * w, reference[1] + 0.5 * h);
        let (dx, dy) = (deltas[0] / wx, deltas[1] / wy);
        let (dw, dh) = (
            (deltas[2] / ww).min(self.clip),
            (deltas[3] / wh).min(self.clip),
        );
        let (px, py) = (dx * w + cx, dy * h + cy);
        let (pw, ph) = (dw.exp() * w, dh.exp() * h);
        let (hw, hh) = (0.5 * pw, 0.5 * ph);
        [px - hw, py - hh, px + hw, py + hh]
    }
}

/// IoU of two boxes (torchvision's `box_iou` arithmetic).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area_a = (a[2] - a[0]) * (a[3] - a[1]);
    let area_b = (b[2] - b[0]) * (b[3] - b[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (area_a + area_b - inter)
}

/// torchvision's `Matcher`: for each of `n` candidates the index of its best GT,
/// -1 below `low`, -2 between `low` and `high`; with `low_quality`, each GT's best
/// candidates (ties included) keep their match whatever its IoU. `iou[g * n + i]`.
pub fn match_boxes(
    iou: &[f32],
    num_gt: usize,
    n: usize,
    high: f32,
    low: f32,
    low_quality: bool,
) -> Vec<i64> {
    let mut matches = vec![-1i64; n];
    let mut best = vec![f32::NEG_INFINITY; n];
    for i in 0..n {
        // torch.max(dim=0) keeps the first maximum.
        for g in 0..num_gt {
            let v = iou[g * n + i];
            if g == 0 || v > best[i] {
                best[i] = v;
                matches[i] = g as i64;
            }
        }
    }
    let all = matches.clone();
    for i in 0..n {
        if best[i] < low {
            matches[i] = -1;
        } else if best[i] < high {
            matches[i] = -2;
        }
    }
    if low_quality {
        for g in 0..num_gt {
            let row = &iou[g * n..(g + 1) * n];
            let top = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for (i, &v) in row.iter().enumerate() {
                if v == top {
                    matches[i] = all[i];
                }
            }
        }
    }
    matches
}

/// torchvision's `BalancedPositiveNegativeSampler` for one image: positives are
/// `labels >= 1`, negatives `labels == 0`; returns the sampled (positive, negative)
/// indices, each ascending. With a batch size at least the number of candidates,
/// every candidate is taken and `rng` is not used.
pub fn sample(
    labels: &[i64],
    batch_size: usize,
    positive_fraction: f64,
    rng: &mut Rng,
) -> (Vec<usize>, Vec<usize>) {
    let pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 1).collect();
    let neg: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 0).collect();
    let num_pos = ((batch_size as f64 * positive_fraction) as usize).min(pos.len());
    let num_neg = (batch_size - num_pos).min(neg.len());
    (choose(pos, num_pos, rng), choose(neg, num_neg, rng))
}

fn choose(mut v: Vec<usize>, k: usize, rng: &mut Rng) -> Vec<usize> {
    if k < v.len() {
        // Partial Fisher-Yates: a uniform k-subset.
        for i in 0..k {
            let j = i + rng.below((v.len() - i) as u64) as usize;
            v.swap(i, j);
        }
        v.truncate(k);
        v.sort_unstable();
    }
    v
}

/// Indices of the `k` largest of `scores`, descending; equal scores keep index order
/// (a stable sort), NaN last.
pub fn topk(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| {
        if scores[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    idx.sort_by(|&a, &b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx.truncate(k);
    idx
}
