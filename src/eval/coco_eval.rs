//! pycocotools' `COCOeval` for boxes (`iouType="bbox"`, `useCats=1`), step for step:
//! `evaluate` (per image and category: IoUs, greedy matching at each IoU threshold),
//! `accumulate` (precision at 101 recall thresholds, recall) and `summarize` (the 12
//! numbers). Where pycocotools has a quirk that changes a number, it is kept and the
//! comment says so: the point is that our numbers can be diffed against theirs.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// A ground-truth object.
#[derive(Clone, Debug, PartialEq)]
pub struct GtBox {
    /// Annotation id. pycocotools marks "unmatched" with id 0, so a ground truth with
    /// id 0 never counts as matched there, nor here.
    pub id: i64,
    /// The image it is in.
    pub image_id: i64,
    /// Its category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Area in pixels² used for the area ranges (COCO: the segmentation's area, not
    /// the box's).
    pub area: f64,
    /// A crowd region: never a false negative; a detection on it is ignored.
    pub iscrowd: bool,
}

/// A detection in COCO form.
#[derive(Clone, Debug, PartialEq)]
pub struct DetBox {
    /// The image it is in.
    pub image_id: i64,
    /// Its category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

/// The ground truth: every image and category evaluated, and the annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroundTruth {
    /// Images evaluated (duplicates are ignored; order does not matter).
    pub image_ids: Vec<i64>,
    /// Categories evaluated (duplicates are ignored; order does not matter).
    pub category_ids: Vec<i64>,
    /// Annotations in file order (the order breaks ties, as in pycocotools).
    pub annotations: Vec<GtBox>,
}

/// Evaluation settings; the default is pycocotools' `Params(iouType="bbox")`.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalParams {
    /// IoU thresholds T (default 0.50:0.05:0.95, as `np.linspace` computes them).
    pub iou_thrs: Vec<f64>,
    /// Recall thresholds R (default 0:0.01:1, 101 values).
    pub rec_thrs: Vec<f64>,
    /// Detections kept per image M (default 1, 10, 100; sorted before use).
    pub max_dets: Vec<usize>,
    /// Area ranges A in pixels² with their labels (default all, small, medium, large).
    pub area_rngs: Vec<(String, [f64; 2])>,
}

impl Default for EvalParams {
    fn default() -> Self {
        EvalParams {
            iou_thrs: linspace(0.5, 0.95, 10),
            rec_thrs: linspace(0.0, 1.0, 101),
            max_dets: vec![1, 10, 100],
            area_rngs: vec![
                ("all".into(), [0.0, 1e5 * 1e5]),
                ("small".into(), [0.0, 32.0 * 32.0]),
                ("medium".into(), [32.0 * 32.0, 96.0 * 96.0]),
                ("large".into(), [96.0 * 96.0, 1e5 * 1e5]),
            ],
        }
    }
}

/// `np.linspace(start, stop, num)`: `start + i * step` with the last value set to
/// `stop`. The IoU thresholds must be bit-equal to pycocotools' (a match needs
/// IoU >= threshold, and summarize finds 0.5 and 0.75 by float equality).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// Names of the 12 summary numbers, in order (the keys of pycocotools-style reports).
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// The result of an evaluation.
#[derive(Clone, Debug)]
pub struct CocoEvaluation {
    /// The parameters used.
    pub params: EvalParams,
    /// Categories K, sorted.
    pub category_ids: Vec<i64>,
    /// Precision `[T, R, K, A, M]` row-major; -1 where the category has no ground truth
    /// (in that area range).
    pub precision: Vec<f64>,
    /// Recall `[T, K, A, M]`; -1 as above.
    pub recall: Vec<f64>,
    /// The 12 numbers of `summarize()`, named by [`STAT_NAMES`].
    pub stats: [f64; 12],
}

/// Evaluate with pycocotools' default parameters.
pub fn evaluate(gt: &GroundTruth, dets: &[DetBox]) -> Result<CocoEvaluation> {
    evaluate_with(gt, dets, &EvalParams::default())
}

/// Evaluate `dets` against `gt`. Detections on images outside the ground truth are an
/// error (pycocotools' `loadRes` refuses them); detections of categories outside it are
/// not evaluated. Detection ids are their positions in `dets` plus one, as `loadRes`
/// numbers them.
pub fn evaluate_with(
    gt: &GroundTruth,
    dets: &[DetBox],
    params: &EvalParams,
) -> Result<CocoEvaluation> {
    let mut p = params.clone();
    check_params(&p)?;
    p.max_dets.sort_unstable();
    let img_ids = sorted_unique(&gt.image_ids);
    let cat_ids = sorted_unique(&gt.category_ids);
    check_dets(dets, &img_ids)?;

    let gts = group_gts(gt, &img_ids, &cat_ids);
    let dts = group_dts(dets, &img_ids, &cat_ids);
    let max_det = *p.max_dets.last().expect("checked non-empty");

    // evalImgs[k][a][i], computed per category in parallel (each is independent).
    let eval_imgs: Vec<Vec<Vec<Option<ImgEval>>>> = cat_ids
        .par_iter()
        .map(|&c| {
            let pairs: Vec<Option<Pair>> = img_ids
                .iter()
                .map(|&i| Pair::new(gt, dets, &gts, &dts, (i, c), max_det))
                .collect();
            p.area_rngs
                .iter()
                .map(|(_, rng)| {
                    pairs
                        .iter()
                        .map(|pair| {
                            pair.as_ref()
                                .map(|pr| pr.evaluate(gt, dets, &p, *rng, max_det))
                        })
                        .collect()
                })
                .collect()
        })
        .collect();

    let (precision, recall) = accumulate(&p, &eval_imgs);
    let mut ev = CocoEvaluation {
        params: p,
        category_ids: cat_ids,
        precision,
        recall,
        stats: [0.0; 12],
    };
    ev.stats = ev.summarize();
    Ok(ev)
}

fn check_params(p: &EvalParams) -> Result<()> {
    let op = "coco_eval";
    if p.iou_thrs.is_empty() || p.rec_thrs.is_empty() || p.area_rngs.is_empty() {
        return Err(Error::invalid(
            op,
            "empty IoU thresholds, recall thresholds or area ranges",
        ));
    }
    if p.max_dets.is_empty() || p.max_dets.contains(&0) {
        return Err(Error::invalid(
            op,
            format!("max_dets {:?} must be positive", p.max_dets),
        ));
    }
    Ok(())
}

fn check_dets(dets: &[DetBox], img_ids: &[i64]) -> Result<()> {
    let images: HashSet<i64> = img_ids.iter().copied().collect();
    for (i, d) in dets.iter().enumerate() {
        if !images.contains(&d.image_id) {
            return Err(Error::invalid(
                "coco_eval",
                format!(
                    "detection {i} is on image id {}, which is not in the ground truth",
                    d.image_id
                ),
            ));
        }
        if !d.score.is_finite() || d.bbox.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "coco_eval",
                format!("detection {i} has a non-finite score or box: {d:?}"),
            ));
        }
    }
    Ok(())
}

fn sorted_unique(v: &[i64]) -> Vec<i64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

type Groups = HashMap<(i64, i64), Vec<usize>>;

/// Ground truth per (image, category), as `COCOeval._prepare` builds it:
/// `loadAnns(getAnnIds(imgIds, catIds))` walks images in sorted order and each image's
/// annotations in file order, then looks each id up in a dict where the last
/// annotation with that id wins (a quirk that only matters for duplicate ids).
fn group_gts(gt: &GroundTruth, img_ids: &[i64], cat_ids: &[i64]) -> Groups {
    let cats: HashSet<i64> = cat_ids.iter().copied().collect();
    let mut last_with_id: HashMap<i64, usize> = HashMap::new();
    let mut per_image: HashMap<i64, Vec<usize>> = HashMap::new();
    for (n, a) in gt.annotations.iter().enumerate() {
        last_with_id.insert(a.id, n);
        per_image.entry(a.image_id).or_default().push(n);
    }
    let mut groups = Groups::new();
    for img in img_ids {
        for &n in per_image.get(img).into_iter().flatten() {
            if cats.contains(&gt.annotations[n].category_id) {
                let real = last_with_id[&gt.annotations[n].id];
                let a = &gt.annotations[real];
                groups
                    .entry((a.image_id, a.category_id))
                    .or_default()
                    .push(real);
            }
        }
    }
    groups
}

/// Detections per (image, category), in their order in `dets`.
fn group_dts(dets: &[DetBox], img_ids: &[i64], cat_ids: &[i64]) -> Groups {
    let imgs: HashSet<i64> = img_ids.iter().copied().collect();
    let cats: HashSet<i64> = cat_ids.iter().copied().collect();
    let mut groups = Groups::new();
    for (n, d) in dets.iter().enumerate() {
        if imgs.contains(&d.image_id) && cats.contains(&d.category_id) {
            groups
                .entry((d.image_id, d.category_id))
                .or_default()
                .push(n);
        }
    }
    groups
}

/// Indices sorted by score, highest first; ties keep their order (numpy's
/// `argsort(-scores, kind="mergesort")` is stable, and ties decide matches).
fn argsort_desc(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // Scores are finite (checked), so partial_cmp is total here.
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).expect("finite scores"));
    idx
}

/// One (image, category) with ground truth or detections: `computeIoU`'s output.
struct Pair {
    /// Indices into the annotations, in group order.
    gt: Vec<usize>,
    /// Indices into the detections, by score (highest first), at most maxDets[-1].
    dt: Vec<usize>,
    /// IoU `[D, G]` row-major (empty when D or G is 0, as `maskUtils.iou` returns).
    ious: Vec<f64>,
}

impl Pair {
    fn new(
        gt: &GroundTruth,
        dets: &[DetBox],
        gts: &Groups,
        dts: &Groups,
        key: (i64, i64),
        max_det: usize,
    ) -> Option<Pair> {
        let g: Vec<usize> = gts.get(&key).cloned().unwrap_or_default();
        let d: Vec<usize> = dts.get(&key).cloned().unwrap_or_default();
        if g.is_empty() && d.is_empty() {
            return None;
        }
        let scores: Vec<f64> = d.iter().map(|&n| dets[n].score).collect();
        let mut dt: Vec<usize> = argsort_desc(&scores).into_iter().map(|i| d[i]).collect();
        dt.truncate(max_det);
        let mut ious = Vec::with_capacity(dt.len() * g.len());
        for &dn in &dt {
            for &gn in &g {
                let ga = &gt.annotations[gn];
                ious.push(box_iou(&dets[dn].bbox, &ga.bbox, ga.iscrowd));
            }
        }
        Some(Pair { gt: g, dt, ious })
    }

    /// `evaluateImg(imgId, catId, aRng, maxDet)`.
    fn evaluate(
        &self,
        gt: &GroundTruth,
        dets: &[DetBox],
        p: &EvalParams,
        rng: [f64; 2],
        max_det: usize,
    ) -> ImgEval {
        let outside = |area: f64| area < rng[0] || area > rng[1];
        let g_all = self.gt.len();
        let ignore: Vec<bool> = self
            .gt
            .iter()
            .map(|&n| {
                let a = &gt.annotations[n];
                // `_prepare` sets ignore = iscrowd (any `ignore` field is overwritten).
                a.iscrowd || outside(a.area)
            })
            .collect();
        // Ground truth not ignored first, stable.
        let mut gtind: Vec<usize> = (0..g_all).collect();
        gtind.sort_by_key(|&j| ignore[j]);
        let g_ig: Vec<bool> = gtind.iter().map(|&j| ignore[j]).collect();
        let g_crowd: Vec<bool> = gtind
            .iter()
            .map(|&j| gt.annotations[self.gt[j]].iscrowd)
            .collect();
        let g_id: Vec<i64> = gtind
            .iter()
            .map(|&j| gt.annotations[self.gt[j]].id)
            .collect();
        let dt = &self.dt[..self.dt.len().min(max_det)];
        let (t_n, g_n, d_n) = (p.iou_thrs.len(), g_all, dt.len());

        let mut gtm = vec![0i64; t_n * g_n];
        let mut dtm = vec![0i64; t_n * d_n];
        let mut dt_ig = vec![false; t_n * d_n];
        if !self.ious.is_empty() {
            for (t, &thr) in p.iou_thrs.iter().enumerate() {
                for (d, &dn) in dt.iter().enumerate() {
                    let mut best = thr.min(1.0 - 1e-10);
                    let mut m: Option<usize> = None;
                    for g in 0..g_n {
                        // A matched ground truth is taken, unless it is a crowd region.
                        if gtm[t * g_n + g] > 0 && !g_crowd[g] {
                            continue;
                        }
                        // Matched to a regular object: stop at the ignored ones (sorted last).
                        if m.is_some_and(|m| !g_ig[m]) && g_ig[g] {
                            break;
                        }
                        let iou = self.ious[d * g_all + gtind[g]];
                        if iou < best {
                            continue;
                        }
                        best = iou;
                        m = Some(g);
                    }
                    if let Some(m) = m {
                        dt_ig[t * d_n + d] = g_ig[m];
                        dtm[t * d_n + d] = g_id[m];
                        // Detection ids are 1-based positions in the results (loadRes).
                        gtm[t * g_n + m] = dn as i64 + 1;
                    }
                }
            }
        }
        // Unmatched detections outside the area range are ignored. "Unmatched" is
        // dtm == 0, as in pycocotools.
        for (d, &dn) in dt.iter().enumerate() {
            let b = &dets[dn].bbox;
            if outside(b[2] * b[3]) {
                for t in 0..t_n {
                    if dtm[t * d_n + d] == 0 {
                        dt_ig[t * d_n + d] = true;
                    }
                }
            }
        }
        ImgEval {
            dt_scores: dt.iter().map(|&n| dets[n].score).collect(),
            dt_matches: dtm,
            dt_ignore: dt_ig,
            gt_ignore: g_ig,
        }
    }
}

/// `maskUtils.iou` for boxes (`bbIou` in maskApi.c): intersection over union, or over
/// the detection's area when the ground truth is a crowd region. Boxes `[x, y, w, h]`.
pub fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let (da, ga) = (d[2] * d[3], g[2] * g[3]);
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// Per-image result for one category and area range.
struct ImgEval {
    /// `[D]`, highest first.
    dt_scores: Vec<f64>,
    /// `[T, D]`: id of the matched ground truth, 0 if none.
    dt_matches: Vec<i64>,
    /// `[T, D]`.
    dt_ignore: Vec<bool>,
    /// `[G]`.
    gt_ignore: Vec<bool>,
}

/// `accumulate()`: precision `[T, R, K, A, M]` and recall `[T, K, A, M]`.
fn accumulate(p: &EvalParams, eval_imgs: &[Vec<Vec<Option<ImgEval>>>]) -> (Vec<f64>, Vec<f64>) {
    let (t_n, r_n, k_n, a_n, m_n) = (
        p.iou_thrs.len(),
        p.rec_thrs.len(),
        eval_imgs.len(),
        p.area_rngs.len(),
        p.max_dets.len(),
    );
    let mut precision = vec![-1.0; t_n * r_n * k_n * a_n * m_n];
    let mut recall = vec![-1.0; t_n * k_n * a_n * m_n];
    for (k, per_area) in eval_imgs.iter().enumerate() {
        for (a, per_img) in per_area.iter().enumerate() {
            let e: Vec<&ImgEval> = per_img.iter().flatten().collect();
            if e.is_empty() {
                continue;
            }
            for (m, &max_det) in p.max_dets.iter().enumerate() {
                let Some(curves) = pr_curves(p, &e, max_det) else {
                    continue;
                };
                for (t, (q, rc)) in curves.into_iter().enumerate() {
                    recall[((t * k_n + k) * a_n + a) * m_n + m] = rc;
                    for (r, v) in q.into_iter().enumerate() {
                        precision[(((t * r_n + r) * k_n + k) * a_n + a) * m_n + m] = v;
                    }
                }
            }
        }
    }
    (precision, recall)
}

/// For each IoU threshold: precision at the recall thresholds and the final recall, of
/// the detections (first `max_det` per image) of all images together. `None` when there
/// is no ground truth that is not ignored.
fn pr_curves(p: &EvalParams, e: &[&ImgEval], max_det: usize) -> Option<Vec<(Vec<f64>, f64)>> {
    let t_n = p.iou_thrs.len();
    let npig = e
        .iter()
        .flat_map(|x| &x.gt_ignore)
        .filter(|&&ig| !ig)
        .count();
    if npig == 0 {
        return None;
    }
    // Concatenate images in order, then sort all detections by score (stable).
    let mut scores = Vec::new();
    let mut src: Vec<(usize, usize)> = Vec::new(); // (image, detection) of each column
    for (i, x) in e.iter().enumerate() {
        let d_n = x.dt_scores.len().min(max_det);
        scores.extend_from_slice(&x.dt_scores[..d_n]);
        src.extend((0..d_n).map(|d| (i, d)));
    }
    let order = argsort_desc(&scores);
    let nd = order.len();
    let eps = f64::EPSILON; // np.spacing(1)
    let curves = (0..t_n)
        .map(|t| {
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut rc = Vec::with_capacity(nd);
            let mut pr = Vec::with_capacity(nd);
            for &c in &order {
                let (i, d) = src[c];
                let x = e[i];
                let d_n = x.dt_scores.len();
                let matched = x.dt_matches[t * d_n + d] != 0;
                if !x.dt_ignore[t * d_n + d] {
                    if matched {
                        tp += 1.0;
                    } else {
                        fp += 1.0;
                    }
                }
                rc.push(tp / npig as f64);
                pr.push(tp / (fp + tp + eps));
            }
            let final_recall = rc.last().copied().unwrap_or(0.0);
            // Precision envelope: monotone non-increasing from the right.
            for i in (1..nd).rev() {
                if pr[i] > pr[i - 1] {
                    pr[i - 1] = pr[i];
                }
            }
            // searchsorted(rc, recThrs, side="left"); past the end stays 0.
            let q = p
                .rec_thrs
                .iter()
                .map(|&r| {
                    let pi = rc.partition_point(|&x| x < r);
                    pr.get(pi).copied().unwrap_or(0.0)
                })
                .collect();
            (q, final_recall)
        })
        .collect();
    Some(curves)
}

impl CocoEvaluation {
    /// `summarize()`'s `_summarize`: the mean of the precision (`ap`) or recall entries
    /// that are not -1, at IoU threshold `iou` (all when `None`), area range label
    /// `area` and `max_dets`; -1 when there are none.
    pub fn summarize_one(&self, ap: bool, iou: Option<f64>, area: &str, max_dets: usize) -> f64 {
        let p = &self.params;
        let (t_n, r_n, k_n, a_n, m_n) = (
            p.iou_thrs.len(),
            p.rec_thrs.len(),
            self.category_ids.len(),
            p.area_rngs.len(),
            p.max_dets.len(),
        );
        // Float equality on purpose: pycocotools selects thresholds with `==`.
        let ts: Vec<usize> = (0..t_n)
            .filter(|&t| iou.is_none_or(|v| p.iou_thrs[t] == v))
            .collect();
        let a_sel: Vec<usize> = (0..a_n).filter(|&a| p.area_rngs[a].0 == area).collect();
        let m_sel: Vec<usize> = (0..m_n).filter(|&m| p.max_dets[m] == max_dets).collect();
        let (mut sum, mut n) = (0.0f64, 0usize);
        let mut add = |v: f64| {
            if v > -1.0 {
                sum += v;
                n += 1;
            }
        };
        for &t in &ts {
            for k in 0..k_n {
                for &a in &a_sel {
                    for &m in &m_sel {
                        if ap {
                            for r in 0..r_n {
                                add(self.precision[(((t * r_n + r) * k_n + k) * a_n + a) * m_n + m]);
                            }
                        } else {
                            add(self.recall[((t * k_n + k) * a_n + a) * m_n + m]);
                        }
                    }
                }
            }
        }
        if n == 0 {
            -1.0
        } else {
            sum / n as f64
        }
    }

    /// The 12 numbers of `_summarizeDets`.
    fn summarize(&self) -> [f64; 12] {
        let md = &self.params.max_dets;
        let md_at = |i: usize| md.get(i).copied().unwrap_or(0);
        let last = md_at(2);
        let s = |ap, iou, area, m| self.summarize_one(ap, iou, area, m);
        // pycocotools asks for maxDets=100 literally here, which is -1 when the
        // largest maxDets is not 100; using the largest gives its number for the
        // default and a real AP when a detector keeps more (dense scenes).
        [
            s(true, None, "all", last),
            s(true, Some(0.5), "all", last),
            s(true, Some(0.75), "all", last),
            s(true, None, "small", last),
            s(true, None, "medium", last),
            s(true, None, "large", last),
            s(false, None, "all", md_at(0)),
            s(false, None, "all", md_at(1)),
            s(false, None, "all", last),
            s(false, None, "small", last),
            s(false, None, "medium", last),
            s(false, None, "large", last),
        ]
    }

    /// AP@[.5:.95] of each category (all areas, the largest maxDets), -1 where the
    /// category has no ground truth: `(category_id, AP)`.
    pub fn per_category_ap(&self) -> Vec<(i64, f64)> {
        let p = &self.params;
        let (t_n, r_n, k_n, a_n, m_n) = (
            p.iou_thrs.len(),
            p.rec_thrs.len(),
            self.category_ids.len(),
            p.area_rngs.len(),
            p.max_dets.len(),
        );
        let Some(a) = p.area_rngs.iter().position(|(l, _)| l == "all") else {
            return self.category_ids.iter().map(|&c| (c, -1.0)).collect();
        };
        let m = m_n - 1;
        (0..k_n)
            .map(|k| {
                let v: Vec<f64> = (0..t_n)
                    .flat_map(|t| (0..r_n).map(move |r| (t, r)))
                    .map(|(t, r)| self.precision[(((t * r_n + r) * k_n + k) * a_n + a) * m_n + m])
                    .filter(|&v| v > -1.0)
                    .collect();
                let ap = if v.is_empty() {
                    -1.0
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                };
                (self.category_ids[k], ap)
            })
            .collect()
    }

    /// The 12-line summary exactly as pycocotools prints it.
    pub fn summary(&self) -> String {
        summary_lines(&self.stats, &self.params)
    }
}

/// The 12-line summary of `stats` in pycocotools' format, for the default parameters.
pub fn format_summary(stats: &[f64; 12]) -> String {
    summary_lines(stats, &EvalParams::default())
}

fn summary_lines(stats: &[f64; 12], p: &EvalParams) -> String {
    let md = |i: usize| p.max_dets.get(i).copied().unwrap_or(0);
    let iou_range = format!(
        "{:.2}:{:.2}",
        p.iou_thrs.first().copied().unwrap_or(0.0),
        p.iou_thrs.last().copied().unwrap_or(0.0)
    );
    // (ap, IoU label, area, maxDets) of each stat, as `_summarizeDets` calls them.
    let rows: [(bool, &str, &str, usize); 12] = [
        (true, &iou_range, "all", md(2)),
        (true, "0.50", "all", md(2)),
        (true, "0.75", "all", md(2)),
        (true, &iou_range, "small", md(2)),
        (true, &iou_range, "medium", md(2)),
        (true, &iou_range, "large", md(2)),
        (false, &iou_range, "all", md(0)),
        (false, &iou_range, "all", md(1)),
        (false, &iou_range, "all", md(2)),
        (false, &iou_range, "small", md(2)),
        (false, &iou_range, "medium", md(2)),
        (false, &iou_range, "large", md(2)),
    ];
    let mut out = String::new();
    for ((ap, iou, area, max_dets), v) in rows.iter().zip(stats) {
        let (title, kind) = if *ap {
            ("Average Precision", "(AP)")
        } else {
            ("Average Recall", "(AR)")
        };
        // ' {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}'
        out.push_str(&format!(
            " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {v:.3}\n"
        ));
    }
    out
}
