//! Which RPN proposal lists torchvision could have returned, given its inputs.
//!
//! torchvision's `RegionProposalNetwork.filter_proposals` leaves three choices to
//! orders that PyTorch does not specify, and real images make them matter (anchors
//! over a flat region or over the batch's zero padding get bit-identical logits and
//! deltas, so their boxes are shifted copies that overlap above the NMS threshold):
//!
//! 1. `torch.topk` (per level, `pre_nms_top_n`) picks any of the logits equal to the
//!    k-th at the cut-off, and returns equal logits in any order. That order is the
//!    order in which NMS (a stable sort by score) visits them, so it decides which of
//!    two tied, overlapping boxes survives.
//! 2. The kept boxes are sorted by score with an unstable sort: equal scores (sigmoid
//!    values) come in any order. Equal as torch computes them: its f32 sigmoid is
//!    within one ulp of the exact value, so sigmoids one ulp apart here may be equal
//!    there ([`torch_may_equal`]).
//! 3. So `post_nms_top_n` may cut anywhere inside the run of equal last scores.
//!
//! [`check`] accepts a list exactly when some choice of these gives it:
//!
//! - every box is a distinct candidate (an anchor's decoded box, clipped, with both
//!   sides `>= min_size` and score `>= score_thresh`) whose logit is at least its
//!   level's k-th largest, within [`MATCH_TOL`] pixels; at most `post_nms_top_n` boxes;
//! - consecutive boxes have non-increasing logits or equal scores (choice 2);
//! - boxes of one level never overlap with IoU `> nms_thresh` (the IoU computed as
//!   torchvision's CPU NMS kernel does, in f32, compared in f64);
//! - every other candidate of a level whose logit is above the k-th is explained:
//!   a listed box of the same level with a logit `>=` its own overlaps it with IoU
//!   `> nms_thresh` (it was visited first: a higher logit, or an equal one that
//!   topk may put first), or the list was cut at `post_nms_top_n` and its score is
//!   `<=` the last listed score (choice 3);
//! - at a level's cut-off (more candidates than `pre_nms_top_n`), the number of
//!   logits equal to the k-th that topk must take, `k - #(logit > k-th)`, lies
//!   between the listed ones with that logit and those plus the unlisted ones that
//!   would be explained (by the rule above, or by failing the filter) if taken.
//!
//! These conditions are necessary, and sufficient: put each level's tied listed boxes
//! before its tied unlisted ones in the topk order, and NMS then keeps exactly the
//! listed boxes. Without ties the accepted list is unique, so this is an exact
//! comparison; nothing is loosened (box values are then compared by candidate at the
//! usual tolerance).

/// One anchor's candidate proposal.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Objectness logit.
    pub logit: f32,
    /// Decoded and clipped box (x1, y1, x2, y2), pixels.
    pub bbox: [f32; 4],
    /// Passes the size and score filters.
    pub eligible: bool,
}

/// The selection settings (torchvision's RPN in one mode).
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub pre_nms_top_n: usize,
    pub post_nms_top_n: usize,
    pub nms_thresh: f64,
    pub score_thresh: f32,
    pub min_size: f32,
}

/// Largest coordinate difference (pixels) at which a listed box is taken to be a
/// candidate's box. Neighbouring anchors differ by a stride (>= 4 pixels); the box
/// values themselves are compared by the caller at the stage tolerance.
pub const MATCH_TOL: f32 = 1e-2;

/// sigmoid rounded to f32 from f64 (within half an ulp of the exact value).
pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// Whether torch's f32 sigmoid may give `a` and `b` (correctly rounded sigmoids, see
/// [`sigmoid`]) the same value: its vectorised CPU sigmoid is within one ulp of the
/// exact value, so two values one ulp apart here may be one value there (and be
/// ordered either way by its unstable sort).
pub fn torch_may_equal(a: f32, b: f32) -> bool {
    let m = a.abs().max(b.abs());
    let ulp = if m == 0.0 {
        0.0
    } else {
        f32::from_bits(m.to_bits() & 0x7f80_0000) * f32::EPSILON
    };
    (a - b).abs() <= ulp
}

/// torchvision's `BoxCoder.decode_single` with weights (1, 1, 1, 1) in f32.
pub fn decode(delta: &[f32], anchor: &[f32]) -> [f32; 4] {
    let clip = (1000.0f64 / 16.0).ln() as f32;
    let (w, h) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
    let (cx, cy) = (anchor[0] + 0.5 * w, anchor[1] + 0.5 * h);
    let (dw, dh) = (delta[2].min(clip), delta[3].min(clip));
    let (px, py) = (delta[0] * w + cx, delta[1] * h + cy);
    let (pw, ph) = (dw.exp() * w, dh.exp() * h);
    let (hw, hh) = (0.5 * pw, 0.5 * ph);
    [px - hw, py - hh, px + hw, py + hh]
}

fn clamp(v: f32, hi: f32) -> f32 {
    v.max(0.0).min(hi)
}

/// The candidates of one image, level by level: `logits` `[A]` and `deltas` `[A, 4]`
/// in torchvision's flattened head order, `anchors` `[A, 4]`, `(h, w)` image size.
pub fn candidates(
    logits: &[f32],
    deltas: &[f32],
    anchors: &[f32],
    level_sizes: &[usize],
    (h, w): (usize, usize),
    rule: &Rule,
) -> Vec<Vec<Candidate>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &n in level_sizes {
        out.push(
            (start..start + n)
                .map(|a| {
                    let b = decode(&deltas[4 * a..4 * a + 4], &anchors[4 * a..4 * a + 4]);
                    let (hf, wf) = (h as f32, w as f32);
                    let b = [
                        clamp(b[0], wf),
                        clamp(b[1], hf),
                        clamp(b[2], wf),
                        clamp(b[3], hf),
                    ];
                    let eligible = b[2] - b[0] >= rule.min_size
                        && b[3] - b[1] >= rule.min_size
                        && sigmoid(logits[a]) >= rule.score_thresh;
                    Candidate {
                        logit: logits[a],
                        bbox: b,
                        eligible,
                    }
                })
                .collect(),
        );
        start += n;
    }
    out
}

/// IoU as torchvision's CPU NMS computes it for kept box `a` and candidate `b`.
pub fn nms_iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let area = |x: &[f32; 4]| (x[2] - x[0]) * (x[3] - x[1]);
    let (xx1, yy1) = (a[0].max(b[0]), a[1].max(b[1]));
    let (xx2, yy2) = (a[2].min(b[2]), a[3].min(b[3]));
    let inter = (xx2 - xx1).max(0.0) * (yy2 - yy1).max(0.0);
    (inter / (area(a) + area(b) - inter)) as f64
}

/// `(level, index in level)` of each listed box, or why no choice of tie orders gives
/// `boxes` (see the module docs).
pub fn check(
    boxes: &[[f32; 4]],
    cands: &[Vec<Candidate>],
    rule: &Rule,
) -> Result<Vec<(usize, usize)>, String> {
    if boxes.len() > rule.post_nms_top_n {
        return Err(format!(
            "{} boxes > post_nms_top_n {}",
            boxes.len(),
            rule.post_nms_top_n
        ));
    }
    if cands.iter().flatten().any(|c| c.logit.is_nan()) {
        return Err("NaN logits are not modelled here".into());
    }
    // Each level's k-th largest logit.
    let kth: Vec<f32> = cands
        .iter()
        .map(|lv| {
            let mut v: Vec<f32> = lv.iter().map(|c| c.logit).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            let k = rule.pre_nms_top_n.min(v.len());
            if k == 0 {
                f32::INFINITY
            } else {
                v[k - 1]
            }
        })
        .collect();
    // Match boxes to candidates: the nearest unused eligible one within MATCH_TOL.
    // Clipping can make boxes of several candidates equal; among equally near ones,
    // prefer a level where no box matched so far overlaps it above the threshold
    // (NMS kept both), then the higher logit. Any matching that passes the checks
    // below is a witness that the list is possible.
    let mut used: Vec<Vec<bool>> = cands.iter().map(|lv| vec![false; lv.len()]).collect();
    let mut matched = Vec::with_capacity(boxes.len());
    let mut kept: Vec<Vec<[f32; 4]>> = vec![Vec::new(); cands.len()];
    for (p, b) in boxes.iter().enumerate() {
        let mut best: Option<((f32, bool, f32), usize, usize)> = None;
        for (l, lv) in cands.iter().enumerate() {
            for (i, c) in lv.iter().enumerate() {
                if used[l][i] || !c.eligible || c.logit < kth[l] {
                    continue;
                }
                let d = (0..4)
                    .map(|j| (c.bbox[j] - b[j]).abs())
                    .fold(0.0f32, f32::max);
                if d > MATCH_TOL {
                    continue;
                }
                let clash = kept[l].iter().any(|k| nms_iou(k, b) > rule.nms_thresh);
                let key = (d, clash, -c.logit);
                let better = match &best {
                    None => true,
                    Some((bk, _, _)) => {
                        (key.0, key.1) < (bk.0, bk.1)
                            || ((key.0, key.1) == (bk.0, bk.1) && key.2 < bk.2)
                    }
                };
                if better {
                    best = Some((key, l, i));
                }
            }
        }
        let (_, l, i) = best.ok_or_else(|| {
            format!(
                "box {p} {b:?} is no eligible top-{} candidate",
                rule.pre_nms_top_n
            )
        })?;
        used[l][i] = true;
        kept[l].push(*b);
        matched.push((l, i));
    }
    let logit = |&(l, i): &(usize, usize)| cands[l][i].logit;
    for (p, w) in matched.windows(2).enumerate() {
        let (a, b) = (logit(&w[0]), logit(&w[1]));
        if a < b && !torch_may_equal(sigmoid(a), sigmoid(b)) {
            return Err(format!(
                "boxes {p} and {}: logit {a} before {b}, scores {} < {}",
                p + 1,
                sigmoid(a),
                sigmoid(b)
            ));
        }
    }
    let cut = boxes.len() == rule.post_nms_top_n;
    let last_score = matched.last().map_or(f32::INFINITY, |m| sigmoid(logit(m)));
    for (l, lv) in cands.iter().enumerate() {
        let listed: Vec<(usize, &[f32; 4])> = matched
            .iter()
            .zip(boxes)
            .filter(|((ml, _), _)| *ml == l)
            .map(|(&(_, i), b)| (i, b))
            .collect();
        for (x, &(i, a)) in listed.iter().enumerate() {
            for &(j, b) in &listed[x + 1..] {
                let iou = nms_iou(a, b);
                if iou > rule.nms_thresh {
                    return Err(format!(
                        "level {l}: listed candidates {i} and {j} overlap with IoU {iou}"
                    ));
                }
            }
        }
        let explained = |i: usize, c: &Candidate| {
            !c.eligible
                || (cut
                    && (sigmoid(c.logit) <= last_score
                        || torch_may_equal(sigmoid(c.logit), last_score)))
                || listed.iter().any(|&(j, b)| {
                    lv[j].logit >= c.logit && j != i && nms_iou(b, &c.bbox) > rule.nms_thresh
                })
        };
        let (mut above, mut tied_listed, mut tied_explained) = (0usize, 0usize, 0usize);
        for (i, c) in lv.iter().enumerate() {
            if c.logit < kth[l] {
                continue;
            }
            if c.logit > kth[l] {
                above += 1;
                if !used[l][i] && !explained(i, c) {
                    return Err(format!(
                        "level {l}: candidate {i} (logit {}, box {:?}) is neither listed nor \
                         suppressed by a listed box nor cut",
                        c.logit, c.bbox
                    ));
                }
            } else if used[l][i] {
                tied_listed += 1;
            } else if explained(i, c) {
                tied_explained += 1;
            }
        }
        let k = rule.pre_nms_top_n.min(lv.len());
        if k > 0 {
            let need = k - above;
            if need < tied_listed || need > tied_listed + tied_explained {
                return Err(format!(
                    "level {l}: topk takes {need} logits equal to the k-th ({}), but {} are \
                     listed and {} more could be taken unlisted",
                    kth[l], tied_listed, tied_explained
                ));
            }
        }
    }
    Ok(matched)
}
