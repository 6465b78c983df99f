//! Which detection lists a box head's post-processing could have returned, given its
//! own candidates.
//!
//! torchvision's `postprocess_detections` runs `batched_nms` per image (per class)
//! and keeps the best `detections_per_img` by score. Two choices there are left to
//! orders PyTorch does not specify, and real images make them matter: RoIs over a
//! flat region (or the batch's zero padding) get bit-identical features, so their
//! class scores are bit-identical and their boxes are shifted copies that overlap.
//!
//! 1. NMS visits equal scores in an unspecified order (its sort is not stable), and
//!    that order decides which of two tied, overlapping boxes survives.
//! 2. The final top-k by score may cut anywhere inside the run of equal last scores.
//!
//! [`check`] accepts a list exactly when some choice of these gives it from the
//! candidates (every (RoI, class) that passed the score and size filters, with the
//! engine's own decoded boxes and scores, bit for bit):
//!
//! - every listed detection is a distinct candidate; at most `top` of them; scores
//!   non-increasing;
//! - two listed detections of one class never overlap with IoU `> nms_thresh` (the
//!   IoU as torchvision's CPU NMS kernel computes it, in f32);
//! - every unlisted candidate is explained: a listed detection of its class with a
//!   score `>=` its own overlaps it with IoU `> nms_thresh` (visited first: a higher
//!   score, or an equal one that the sort may put first), or the list is full and
//!   its score is `<=` the last listed score (cut by the top-k).
//!
//! These are necessary, and sufficient: put each run of equal scores' listed
//! detections before its unlisted ones, and greedy NMS keeps exactly the listed ones
//! (a listed one overlaps no earlier kept one; an unlisted one meets its suppressor
//! first). Without ties the accepted list is unique, so nothing is loosened.

use super::proposal_ties::nms_iou;

/// One (RoI, class) candidate detection of one image, or one listed detection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Det {
    /// The engine's candidate index (`select_detections`' indices).
    pub index: i64,
    /// Class label (1-based).
    pub label: i64,
    /// Score (class probability).
    pub score: f32,
    /// Box (x1, y1, x2, y2), resized-image pixels.
    pub bbox: [f32; 4],
}

/// Ok when some tie order gives `listed` from `cands` (see the module docs);
/// otherwise the first condition that no order satisfies.
pub fn check(listed: &[Det], cands: &[Det], nms_thresh: f64, top: usize) -> Result<(), String> {
    if listed.len() > top {
        return Err(format!("{} detections listed, at most {top}", listed.len()));
    }
    for (n, d) in listed.iter().enumerate() {
        let c = cands
            .iter()
            .find(|c| c.index == d.index)
            .ok_or_else(|| format!("detection {n} (candidate {}) is no candidate", d.index))?;
        if c != d {
            return Err(format!("detection {n} is {d:?}, its candidate {c:?}"));
        }
        if listed[..n].iter().any(|e| e.index == d.index) {
            return Err(format!("candidate {} listed twice", d.index));
        }
        if n > 0 && listed[n - 1].score < d.score {
            return Err(format!(
                "scores increase at detection {n}: {} then {}",
                listed[n - 1].score,
                d.score
            ));
        }
        if let Some(e) = listed[..n]
            .iter()
            .find(|e| e.label == d.label && nms_iou(&e.bbox, &d.bbox) > nms_thresh)
        {
            return Err(format!(
                "listed {d:?} and {e:?} overlap with IoU {} > {nms_thresh}",
                nms_iou(&e.bbox, &d.bbox)
            ));
        }
    }
    let cut = (listed.len() == top).then(|| listed.last().map_or(f32::INFINITY, |d| d.score));
    for c in cands {
        if listed.iter().any(|d| d.index == c.index) {
            continue;
        }
        let suppressed = listed.iter().any(|k| {
            k.label == c.label && k.score >= c.score && nms_iou(&k.bbox, &c.bbox) > nms_thresh
        });
        let cut_off = cut.is_some_and(|s| c.score <= s);
        if !suppressed && !cut_off {
            return Err(format!(
                "candidate {c:?} is neither listed, nor suppressed by a listed detection of \
                 its class with a score at least its own, nor below the top-{top} cut"
            ));
        }
    }
    Ok(())
}

/// Why torchvision could list `c` where the engine did not, given torchvision's
/// scores (`tv_score` of a candidate index): the engine left `c` out for a listed `k`
/// (suppressed by it, or cut after it when the list is full) whose order relative to
/// `c` is not decided by the scores as computed: `|tv(c) - tv(k)| <= dev(c) + dev(k)`,
/// `dev` being each one's engine-vs-torchvision score difference (an exact tie in
/// torchvision is the case `tv(c) == tv(k)`). Since the engine put `k` first,
/// `e(k) >= e(c)`, so torchvision may order them the other way only if this holds;
/// the caller bounds every `dev` by the stage tolerance. Returns `k`.
pub fn order_flip<'a>(
    listed: &'a [Det],
    c: &Det,
    nms_thresh: f64,
    top: usize,
    tv_score: impl Fn(i64) -> f32,
) -> Option<&'a Det> {
    let dev = |d: &Det| (d.score as f64 - tv_score(d.index) as f64).abs();
    let close =
        |k: &Det| (tv_score(c.index) as f64 - tv_score(k.index) as f64).abs() <= dev(c) + dev(k);
    let suppressor = listed
        .iter()
        .find(|k| k.label == c.label && nms_iou(&k.bbox, &c.bbox) > nms_thresh && close(k));
    let cut = listed
        .last()
        .filter(|last| listed.len() == top && c.score <= last.score && close(last));
    suppressor.or(cut)
}

/// The same detections in the same order, except that detections of equal
/// torchvision score may come in any order: torchvision's per-class ("vanilla")
/// batched NMS, which it uses above 4000 box coordinates, sorts the kept boxes with
/// an unstable sort (RoIs over a flat region get bit-identical scores). So within
/// each run of equal torchvision scores, the engine's detections at those positions
/// must pair one to one with torchvision's (same label, nearest box); then labels
/// exactly, and boxes and scores within `tol` (relative to the largest value), pair by
/// pair.
pub fn assert_same_order_up_to_ties(
    what: &str,
    got: &kestrel::detection::Detections,
    want: &kestrel::detection::Detections,
    tol: f64,
) {
    let n = want.boxes.len();
    assert_eq!(got.boxes.len(), n, "{what}: count");
    let mut pair = vec![0; n];
    let mut k = 0;
    while k < n {
        let end = (k..n)
            .find(|&e| want.scores[e] != want.scores[k])
            .unwrap_or(n);
        let mut used = vec![false; end - k];
        for (w, slot) in pair.iter_mut().enumerate().take(end).skip(k) {
            let dist = |j: usize| {
                (0..4)
                    .map(|c| (got.boxes[j][c] - want.boxes[w][c]).abs())
                    .fold(0.0f32, f32::max)
            };
            let j = (k..end)
                .filter(|&j| !used[j - k] && got.labels[j] == want.labels[w])
                .min_by(|&x, &y| dist(x).total_cmp(&dist(y)))
                .unwrap_or_else(|| {
                    panic!(
                        "{what}: labels {:?} at {k}..{end}, torchvision {:?}",
                        &got.labels[k..end],
                        &want.labels[k..end]
                    )
                });
            used[j - k] = true;
            *slot = j;
        }
        k = end;
    }
    let gb: Vec<f64> = pair
        .iter()
        .flat_map(|&j| got.boxes[j].map(|v| v as f64))
        .collect();
    let gs: Vec<f64> = pair.iter().map(|&j| got.scores[j] as f64).collect();
    let ws: Vec<f64> = want.scores.iter().map(|&v| v as f64).collect();
    let (eb, es) = (
        super::rel_err(
            &gb,
            &want
                .boxes
                .iter()
                .flat_map(|b| b.map(|v| v as f64))
                .collect::<Vec<_>>(),
        ),
        super::rel_err(&gs, &ws),
    );
    assert!(eb <= tol, "{what} boxes: relative error {eb:.3e}");
    assert!(es <= tol, "{what} scores: relative error {es:.3e}");
}
