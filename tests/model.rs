//! Faster R-CNN parity with torchvision (fixtures/model), stage by stage, end to end,
//! and in training. The model is built from the configuration in the fixture's
//! `params`, so any fixture set made by make_fixtures.py runs unchanged
//! (`KESTREL_FIXTURES=DIR`; by default the slim set in tests/fixtures).
//!
//! Proposals are compared with the tie rule of `common::proposal_ties`: torchvision's
//! proposal selection leaves the order of equal objectness logits (torch.topk) and of
//! equal scores (an unstable sort) unspecified, so the engine's list must be one that
//! some such order gives, and so must torchvision's own (which checks the rule). The
//! stages after the RPN (RoI sampling, losses, gradients, detections) are fed
//! torchvision's proposals whenever the engine's differ from them by such a choice.

mod common;

use common::{fixture_dets, iou, orig_sizes};

use common::assert_close;
use common::detection_ties::{self, Det};
use common::proposal_ties::{self, Candidate, Rule};
use kestrel::autograd::Tape;
use kestrel::detection::proposals::DetectionParams;
use kestrel::detection::rpn::RpnHeadOutput;
use kestrel::detection::transform::image_from_u8;
use kestrel::detection::{Detections, FasterRcnn, FasterRcnnConfig, Target};
use kestrel::io::TensorFile;
use kestrel::nn::Ctx;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

const STAGE_TOL: f64 = 1e-4;

fn load_model(device: Device) -> FasterRcnn {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let mut cfg = FasterRcnnConfig::from_params(&params).unwrap();
    // The fixture's samplers took every candidate.
    let train = common::fixture("model/train.safetensors");
    let tp = train.params().unwrap();
    cfg.rpn.batch_size_per_image = tp["rpn_batch_size_per_image"].as_u64().unwrap() as usize;
    cfg.roi.batch_size_per_image = tp["box_batch_size_per_image"].as_u64().unwrap() as usize;
    let mut m = FasterRcnn::load(cfg, &path).unwrap();
    m.to_device(device).unwrap();
    m
}

fn images(f: &TensorFile, device: Device) -> Vec<Tensor> {
    (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            image_from_u8(&bytes, s.dim(1), s.dim(2))
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect()
}

fn on(t: Tensor, d: Device) -> Tensor {
    t.to_device(d).unwrap()
}

fn image_list(f: &TensorFile, device: Device) -> kestrel::detection::transform::ImageList {
    let (sizes, _) = f.ints("transform.image_sizes").unwrap();
    kestrel::detection::transform::ImageList {
        tensors: on(f.tensor("transform.batch").unwrap(), device),
        image_sizes: sizes
            .chunks(2)
            .map(|s| (s[0] as usize, s[1] as usize))
            .collect(),
    }
}

fn feature_names(f: &TensorFile) -> Vec<String> {
    let mut v: Vec<String> = (0..)
        .map(|i| format!("features.{i}"))
        .take_while(|n| f.contains(n))
        .collect();
    v.push("features.pool".into());
    v
}

fn check_stages_on(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model(device);
    let ctx = Ctx::new(&m.params, false);
    let il = image_list(&f, device);

    // Backbone + FPN from the fixture's batch.
    let feats = m.features(&ctx, &il.tensors).unwrap();
    let names = feature_names(&f);
    assert_eq!(feats.len(), names.len());
    for (got, n) in feats.iter().zip(&names) {
        assert_close(n, got, &f.tensor(n).unwrap(), STAGE_TOL);
    }

    // RPN head from the fixture's features.
    let ffeats: Vec<Tensor> = names
        .iter()
        .map(|n| on(f.tensor(n).unwrap(), device))
        .collect();
    let head = m.rpn.head(&ctx, &ffeats).unwrap();
    for (i, (o, d)) in head.objectness.iter().zip(&head.deltas).enumerate() {
        assert_close(
            &format!("rpn.objectness{i}"),
            o,
            &f.tensor(&format!("rpn.objectness{i}")).unwrap(),
            STAGE_TOL,
        );
        assert_close(
            &format!("rpn.deltas{i}"),
            d,
            &f.tensor(&format!("rpn.deltas{i}")).unwrap(),
            STAGE_TOL,
        );
    }

    // Anchors: exact.
    let anchors = m.anchors(&il, &ffeats).unwrap();
    let want = f.tensor("rpn.anchors").unwrap().to_vec::<f32>().unwrap();
    assert_eq!(
        anchors.iter().flatten().copied().collect::<Vec<f32>>(),
        want,
        "anchors"
    );

    check_proposal_stage(&f, &m, device);

    // Box head from the fixture's features and proposals.
    let fprops: Vec<Tensor> = (0..il.image_sizes.len())
        .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect();
    let pooled = m
        .roi_heads
        .pool(&ffeats[..4], &fprops, &il.image_sizes)
        .unwrap();
    // The slim in-repo set keeps the pooled features of some RoIs only (their rows in
    // `roi.pooled_rows`); a full set has every row.
    let rows = pooled_rows(&f);
    let pooled = match &rows {
        Some(r) => kestrel::ops::index_select(&pooled, 0, &on(r.clone(), device)).unwrap(),
        None => pooled,
    };
    assert_close(
        "roi.pooled",
        &pooled,
        &f.tensor("roi.pooled").unwrap(),
        STAGE_TOL,
    );
    let fpooled = on(f.tensor("roi.pooled").unwrap(), device);
    let h = m.roi_heads.box_head(&ctx, &fpooled).unwrap();
    let want_head = f.tensor("roi.head").unwrap();
    let want_head = match &rows {
        Some(r) => kestrel::ops::index_select(&want_head, 0, r).unwrap(),
        None => want_head,
    };
    assert_close("roi.head", &h, &want_head, STAGE_TOL);
    let (cl, br) = m
        .roi_heads
        .predictor(&ctx, &on(f.tensor("roi.head").unwrap(), device))
        .unwrap();
    assert_close(
        "roi.class_logits",
        &cl,
        &f.tensor("roi.class_logits").unwrap(),
        STAGE_TOL,
    );
    assert_close(
        "roi.box_regression",
        &br,
        &f.tensor("roi.box_regression").unwrap(),
        STAGE_TOL,
    );

    check_postprocess_stage(&f, &m, device);
}

/// Proposals from the fixture's head outputs and anchors, in inference and in training
/// mode (its own pre/post NMS counts): same count and order.
fn check_proposal_stage(f: &TensorFile, m: &FasterRcnn, device: Device) {
    let t = common::fixture("model/train.safetensors");
    for (want, training) in [(f, false), (&t, true)] {
        check_proposals_mode(f, want, m, device, training);
    }
}

fn check_proposals_mode(
    f: &TensorFile,
    want_file: &TensorFile,
    m: &FasterRcnn,
    device: Device,
    training: bool,
) {
    let il = image_list(f, device);
    let levels = feature_names(f).len();
    let fhead = RpnHeadOutput {
        objectness: (0..levels)
            .map(|i| on(f.tensor(&format!("rpn.objectness{i}")).unwrap(), device))
            .collect(),
        deltas: (0..levels)
            .map(|i| on(f.tensor(&format!("rpn.deltas{i}")).unwrap(), device))
            .collect(),
    };
    let anchors = on(f.tensor("rpn.anchors").unwrap(), device);
    let props = m
        .rpn
        .proposals(&fhead, &anchors, &il.image_sizes, training)
        .unwrap();
    assert_eq!(props.len(), il.image_sizes.len(), "images with proposals");
    let rule = tie_rule(m, training);
    for (i, p) in props.iter().enumerate() {
        let what = format!("rpn.proposals{i} (training {training})");
        assert_eq!(p.device(), device, "{what} device");
        let cands = fixture_candidates(f, i, &rule);
        let want = want_file.tensor(&format!("rpn.proposals{i}")).unwrap();
        let (gb, wb) = (box_rows(p), box_rows(&want));
        // torchvision's own list must satisfy the rule (this checks the rule) ...
        let wm = proposal_ties::check(&wb, &cands, &rule)
            .unwrap_or_else(|e| panic!("{what}: torchvision's list breaks the tie rule: {e}"));
        // ... and so must the engine's.
        let gm = proposal_ties::check(&gb, &cands, &rule)
            .unwrap_or_else(|e| panic!("{what}: not a list torchvision could give: {e}"));
        // Box values, candidate by candidate, at the stage tolerance for this op.
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (k, id) in gm.iter().enumerate() {
            if let Some(j) = wm.iter().position(|x| x == id) {
                g.extend(gb[k].iter().map(|&v| v as f64));
                w.extend(wb[j].iter().map(|&v| v as f64));
            }
        }
        let e = common::rel_err(&g, &w);
        assert!(e <= 1e-5, "{what}: relative error {e:.3e} > 1e-5");
        if gm == wm {
            assert_close(&what, p, &want, 1e-5);
        }
    }
}

/// The RPN's selection settings in one mode, for the tie rule.
fn tie_rule(m: &FasterRcnn, training: bool) -> Rule {
    let p = m.rpn.proposal_params(training);
    Rule {
        pre_nms_top_n: p.pre_nms_top_n,
        post_nms_top_n: p.post_nms_top_n,
        nms_thresh: p.nms_thresh,
        score_thresh: p.score_thresh,
        min_size: p.min_size,
    }
}

/// Image `n`'s candidate proposals from the fixture's head outputs and anchors,
/// flattened as torchvision's `concat_box_prediction_layers` does ((row, column,
/// anchor) within a level).
fn fixture_candidates(f: &TensorFile, n: usize, rule: &Rule) -> Vec<Vec<Candidate>> {
    head_candidates(
        &(0..)
            .map(|l| format!("rpn.objectness{l}"))
            .take_while(|k| f.contains(k))
            .map(|k| f.tensor(&k).unwrap())
            .collect::<Vec<_>>(),
        &(0..)
            .map(|l| format!("rpn.deltas{l}"))
            .take_while(|k| f.contains(k))
            .map(|k| f.tensor(&k).unwrap())
            .collect::<Vec<_>>(),
        &f.tensor("rpn.anchors").unwrap().to_vec::<f32>().unwrap(),
        n,
        image_list(f, Device::Cpu).image_sizes[n],
        rule,
    )
}

fn head_candidates(
    objectness: &[Tensor],
    deltas: &[Tensor],
    anchors: &[f32],
    n: usize,
    size: (usize, usize),
    rule: &Rule,
) -> Vec<Vec<Candidate>> {
    let (mut logits, mut codes, mut level_sizes) = (Vec::new(), Vec::new(), Vec::new());
    for (o, d) in objectness.iter().zip(deltas) {
        let (a, h, w) = (o.dims()[1], o.dims()[2], o.dims()[3]);
        let (o, d) = (o.to_vec::<f32>().unwrap(), d.to_vec::<f32>().unwrap());
        let (o, d) = (&o[n * a * h * w..], &d[n * 4 * a * h * w..]);
        for y in 0..h {
            for x in 0..w {
                for k in 0..a {
                    logits.push(o[(k * h + y) * w + x]);
                    codes.extend((0..4).map(|c| d[((4 * k + c) * h + y) * w + x]));
                }
            }
        }
        level_sizes.push(a * h * w);
    }
    proposal_ties::candidates(&logits, &codes, anchors, &level_sizes, size, rule)
}

fn box_rows(t: &Tensor) -> Vec<[f32; 4]> {
    t.to_vec::<f32>()
        .unwrap()
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

/// Rows of `roi.pooled` / `roi.head` that a slim fixture kept, if it is slim.
fn pooled_rows(f: &TensorFile) -> Option<Tensor> {
    f.contains("roi.pooled_rows")
        .then(|| f.int_tensor("roi.pooled_rows").unwrap())
}

/// Detections from the fixture's head outputs and proposals: same count, order,
/// labels.
fn check_postprocess_stage(f: &TensorFile, m: &FasterRcnn, device: Device) {
    let il = image_list(f, device);
    let fprops: Vec<Tensor> = (0..il.image_sizes.len())
        .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect();
    let dets = m
        .roi_heads
        .postprocess(
            &on(f.tensor("roi.class_logits").unwrap(), device),
            &on(f.tensor("roi.box_regression").unwrap(), device),
            &fprops,
            &il.image_sizes,
        )
        .unwrap();
    let orig = orig_sizes(f);
    for (i, d) in dets.into_iter().enumerate() {
        let d = d.resized(il.image_sizes[i], orig[i]).unwrap();
        detection_ties::assert_same_order_up_to_ties(
            &format!("det{i}"),
            &d,
            &fixture_dets(f, i),
            STAGE_TOL,
        );
    }
}

/// RPN anchor labels (matching on the device) and regression targets against the
/// fixture's anchors and targets: labels exact, targets within the stage tolerance.
fn check_rpn_targets_on(device: Device) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let m = load_model(device);
    let il = image_list(&e, device);
    let anchors = on(e.tensor("rpn.anchors").unwrap(), device);
    let coder = kestrel::detection::box_coder::BoxCoder::new([1.0; 4]);
    for (i, t) in common::fixture_targets(&f).iter().enumerate() {
        let t = t.resized(orig_sizes(&e)[i], il.image_sizes[i]);
        let matches = m.rpn.assign(&anchors, &t).unwrap();
        assert_eq!(matches.device(), device, "matches stay on the device");
        let matches = matches.to_vec_i64().unwrap();
        let labels: Vec<f32> = matches
            .iter()
            .map(|&v| match v {
                v if v >= 0 => 1.0,
                -1 => 0.0,
                _ => -1.0,
            })
            .collect();
        let want = f.tensor(&format!("rpn.labels{i}")).unwrap();
        assert_eq!(labels, want.to_vec::<f32>().unwrap(), "rpn.labels{i}");
        let gt: Vec<f32> = matches
            .iter()
            .flat_map(|&v| t.boxes[v.max(0) as usize])
            .collect();
        let gt = on(Tensor::from_vec(gt, [matches.len(), 4]).unwrap(), device);
        let targets = coder.encode(&gt, &anchors).unwrap();
        let want = f.tensor(&format!("rpn.regression_targets{i}")).unwrap();
        assert_close(
            &format!("rpn.regression_targets{i}"),
            &targets,
            &want,
            STAGE_TOL,
        );
    }
}

/// Every detection of `want` pairs with one of `got` and none is left over: the same
/// count; pairs have the same label and IoU > 0.99 (nearest score first, since float
/// rounding end to end may reorder near-equal scores); then the paired boxes and
/// scores within the stage tolerance.
fn same_detections(what: &str, got: &Detections, want: &Detections) -> Result<(), String> {
    if got.boxes.len() != want.boxes.len() {
        return Err(format!(
            "{what}: {} detections, torchvision {}",
            got.boxes.len(),
            want.boxes.len()
        ));
    }
    let mut used = vec![false; got.boxes.len()];
    let (mut gb, mut wb, mut gs, mut ws) = (vec![], vec![], vec![], vec![]);
    for k in 0..want.boxes.len() {
        let Some(hit) = box_match(got, &used, want.labels[k], &want.boxes[k], want.scores[k])
        else {
            return Err(format!(
                "{what}: torchvision's detection {k} (label {}, score {}, box {:?}) has no \
                 match\nengine:\n{}\ntorchvision:\n{}",
                want.labels[k],
                want.scores[k],
                want.boxes[k],
                list_dets(got),
                list_dets(want)
            ));
        };
        used[hit] = true;
        gb.extend(got.boxes[hit].iter().map(|&v| v as f64));
        wb.extend(want.boxes[k].iter().map(|&v| v as f64));
        gs.push(got.scores[hit] as f64);
        ws.push(want.scores[k] as f64);
    }
    let (eb, es) = (common::rel_err(&gb, &wb), common::rel_err(&gs, &ws));
    if eb > STAGE_TOL || es > STAGE_TOL {
        return Err(format!(
            "{what}: relative error of boxes {eb:.3e}, of scores {es:.3e} (> {STAGE_TOL:e})"
        ));
    }
    Ok(())
}

/// The unused detection of `d` with `label` and IoU > 0.99 with `bbox`, nearest in
/// score to `score`.
fn box_match(
    d: &Detections,
    used: &[bool],
    label: i64,
    bbox: &[f32; 4],
    score: f32,
) -> Option<usize> {
    (0..d.boxes.len())
        .filter(|&j| !used[j] && d.labels[j] == label && iou(&d.boxes[j], bbox) > 0.99)
        .min_by(|&x, &y| {
            let e = |j: usize| (d.scores[j] - score).abs();
            e(x).total_cmp(&e(y))
        })
}

fn list_dets(d: &Detections) -> String {
    (0..d.boxes.len())
        .map(|j| format!("{j}: {} {} {:?}", d.labels[j], d.scores[j], d.boxes[j]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Per image, the selected detections of `sel` with their candidate indices
/// (`classes` = the class logits' width, background included).
fn selected_dets(sel: &kestrel::detection::proposals::Selected, classes: usize) -> Vec<Vec<Det>> {
    let counts = sel.host_counts().unwrap();
    let top = sel.scores.dims()[1];
    let (boxes, scores) = (
        sel.boxes.to_vec::<f32>().unwrap(),
        sel.scores.to_vec::<f32>().unwrap(),
    );
    let indices = sel.indices.to_vec_i64().unwrap();
    let per_row = classes as i64 - 1;
    counts
        .iter()
        .enumerate()
        .map(|(n, &k)| {
            (n * top..n * top + k)
                .map(|o| Det {
                    index: indices[o],
                    label: indices[o] % per_row + 1,
                    score: scores[o],
                    bbox: [
                        boxes[4 * o],
                        boxes[4 * o + 1],
                        boxes[4 * o + 2],
                        boxes[4 * o + 3],
                    ],
                })
                .collect()
        })
        .collect()
}

fn as_detections(d: &[Det]) -> Detections {
    Detections {
        boxes: d.iter().map(|d| d.bbox).collect(),
        scores: d.iter().map(|d| d.score).collect(),
        labels: d.iter().map(|d| d.label).collect(),
    }
}

/// The box head's detections on `props` against torchvision's (`det{i}.*` of `f`),
/// returned per image in original-image pixels. Where they are not the same list
/// (`same_detections`), they must differ only by a choice that torchvision's
/// unspecified orders allow: the engine's list passes the tie rule of
/// `common::detection_ties` against the engine's own candidates (its box head's
/// boxes and scores, bit for bit, before NMS), the two lists have the same length
/// and scores (sorted, within the stage tolerance), and every torchvision detection
/// the engine did not list is an engine candidate that it left out for a listed one
/// (by NMS or the top-k cut) whose order with it the scores do not decide
/// (`detection_ties::order_flip`: torchvision's scores of the two differ by no more
/// than their engine-vs-torchvision differences, each within the stage tolerance;
/// e.g. RoIs over a flat region, whose scores are equal or differ in the last bit).
fn check_detections(
    what: &str,
    m: &FasterRcnn,
    il: &kestrel::detection::transform::ImageList,
    features: &[Tensor],
    props: &[Tensor],
    f: &TensorFile,
) -> Vec<Detections> {
    let ctx = Ctx::new(&m.params, false);
    let pooled = m
        .roi_heads
        .pool(&features[..4], props, &il.image_sizes)
        .unwrap();
    let x = m.roi_heads.box_head(&ctx, &pooled).unwrap();
    let (logits, regs) = m.roi_heads.predictor(&ctx, &x).unwrap();
    let classes = logits.dims()[1];
    let params = m.roi_heads.detection_params();
    let select = |p: &DetectionParams| {
        let sel = m
            .roi_heads
            .select(&logits, &regs, props, &il.image_sizes, p)
            .unwrap();
        selected_dets(&sel, classes)
    };
    let listed = select(&params);
    let rows: usize = props.iter().map(|p| p.dims()[0]).sum();
    // No suppression (IoU > 1 never holds) and no cut: every filtered candidate.
    let cands = select(&DetectionParams {
        nms_thresh: 1.0,
        detections_per_img: (rows * (classes - 1)).max(1),
        ..params
    });
    // torchvision's score of a candidate (proposal row, class): its box head's logits
    // (the fixture's, on the same proposals) through softmax in f32. Rows of
    // bit-identical logits (RoIs over a flat region) give bit-identical scores.
    let tv_logits = f
        .tensor("roi.class_logits")
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(tv_logits.len(), rows * classes, "roi.class_logits rows");
    let tv_score = |index: i64| -> f32 {
        let (row, class) = (
            index as usize / (classes - 1),
            index as usize % (classes - 1) + 1,
        );
        let l = &tv_logits[row * classes..(row + 1) * classes];
        let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f32 = l.iter().map(|&v| (v - max).exp()).sum();
        (l[class] - max).exp() / sum
    };
    let orig = orig_sizes(f);
    let mut out = Vec::new();
    for i in 0..props.len() {
        // The candidate index maps to the fixture's rows: torchvision's score of
        // each listed detection is the engine's, within the stage tolerance.
        let (es, ts): (Vec<f64>, Vec<f64>) = listed[i]
            .iter()
            .map(|d| (d.score as f64, tv_score(d.index) as f64))
            .unzip();
        let e = common::rel_err(&es, &ts);
        assert!(
            e <= STAGE_TOL,
            "{what}, image {i}: scores vs torchvision's logits {e:.3e}"
        );
        let what = format!("{what}, image {i}");
        let (from, to) = (il.image_sizes[i], orig[i]);
        let got = as_detections(&listed[i]).resized(from, to).unwrap();
        let want = fixture_dets(f, i);
        if let Err(strict) = same_detections(&what, &got, &want) {
            detection_ties::check(
                &listed[i],
                &cands[i],
                params.nms_thresh,
                params.detections_per_img,
            )
            .unwrap_or_else(|e| {
                panic!("{strict}\n{what}: and no tie order gives the engine's own list: {e}")
            });
            assert_eq!(got.boxes.len(), want.boxes.len(), "{what}: count");
            let sorted = |d: &Detections| {
                let mut s: Vec<f64> = d.scores.iter().map(|&v| v as f64).collect();
                s.sort_by(|a, b| b.total_cmp(a));
                s
            };
            let es = common::rel_err(&sorted(&got), &sorted(&want));
            assert!(
                es <= STAGE_TOL,
                "{what}: sorted scores, relative error {es:.3e}"
            );
            let cand_det = as_detections(&cands[i]).resized(from, to).unwrap();
            let mut used = vec![false; got.boxes.len()];
            let mut ties = 0;
            for k in 0..want.boxes.len() {
                let (l, b, s) = (want.labels[k], &want.boxes[k], want.scores[k]);
                if let Some(j) = box_match(&got, &used, l, b, s) {
                    used[j] = true;
                    continue;
                }
                let c = box_match(&cand_det, &vec![false; cands[i].len()], l, b, s)
                    .unwrap_or_else(|| {
                        panic!("{what}: torchvision's detection {k} ({l}, {s}, {b:?}) is no engine candidate")
                    });
                let dev = |d: &Det| (d.score as f64 - tv_score(d.index) as f64).abs();
                assert!(
                    dev(&cands[i][c]) <= STAGE_TOL * (tv_score(cands[i][c].index) as f64).abs(),
                    "{what}: candidate {:?}: torchvision's score {}",
                    cands[i][c],
                    tv_score(cands[i][c].index)
                );
                detection_ties::order_flip(
                    &listed[i],
                    &cands[i][c],
                    params.nms_thresh,
                    params.detections_per_img,
                    tv_score,
                )
                .unwrap_or_else(|| {
                    let c = &cands[i][c];
                    let near: Vec<String> = listed[i]
                        .iter()
                        .filter(|d| {
                            d.label == c.label
                                && proposal_ties::nms_iou(&d.bbox, &c.bbox) > params.nms_thresh
                        })
                        .map(|d| format!("{d:?} torchvision score {}", tv_score(d.index)))
                        .collect();
                    panic!(
                        "{strict}\n{what}: torchvision's detection {k} is the engine's \
                         candidate {c:?} (torchvision score {}), which the engine left out for no listed detection \
                         whose order with it the scores leave open; listed overlapping it:\n{}",
                        tv_score(c.index),
                        near.join("\n")
                    )
                });
                ties += 1;
            }
            eprintln!("{what}: {ties} of torchvision's detections differ by the order of equal or near-equal scores");
        }
        out.push(got);
    }
    out
}

/// The fixture's proposals of every image (resized-image pixels) from `file`.
fn fixture_proposals(file: &TensorFile, images: usize, device: Device) -> Vec<Tensor> {
    (0..images)
        .map(|i| on(file.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect()
}

/// Images to detections. Where the engine's own proposals are torchvision's (the
/// same list), its detections are compared with torchvision's as they are. Where
/// they differ, they must differ only by a choice the tie rule allows (checked
/// against the engine's own head outputs), and the box head then runs on
/// torchvision's proposals, whose detections must be torchvision's.
fn check_end_to_end_on(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model(device);
    let trace = m.detect_traced(&images(&f, device)).unwrap();
    let fprops = fixture_proposals(&f, trace.proposals.len(), device);
    let same_proposals: Vec<bool> = trace
        .proposals
        .iter()
        .zip(&fprops)
        .map(|(g, w)| {
            g.dims() == w.dims()
                && common::rel_err(&g.to_vec::<f64>().unwrap(), &w.to_vec::<f64>().unwrap())
                    <= STAGE_TOL
        })
        .collect();
    eprintln!("end to end: the engine's proposals are torchvision's per image: {same_proposals:?}");
    let props = if same_proposals.iter().all(|&s| s) {
        trace.proposals.clone()
    } else {
        let ctx = Ctx::new(&m.params, false);
        let head = m.rpn.head(&ctx, &trace.features).unwrap();
        let anchors = m
            .anchors_tensor(&trace.images, &trace.features)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let rule = tie_rule(&m, false);
        for (i, p) in trace.proposals.iter().enumerate() {
            if !same_proposals[i] {
                let cands = head_candidates(
                    &head.objectness,
                    &head.deltas,
                    &anchors,
                    i,
                    trace.images.image_sizes[i],
                    &rule,
                );
                proposal_ties::check(&box_rows(p), &cands, &rule).unwrap_or_else(|e| {
                    panic!("image {i}: the engine's proposals differ from torchvision's: {e}")
                });
            }
        }
        fprops
    };
    let what = if same_proposals.iter().all(|&s| s) {
        "end to end"
    } else {
        "end to end on torchvision's proposals"
    };
    let dets = check_detections(what, &m, &trace.images, &trace.features, &props, &f);
    if same_proposals.iter().all(|&s| s) {
        // The same computation as the traced run: its detections bit for bit.
        for (i, d) in dets.iter().enumerate() {
            let t = &trace.detections[i];
            assert!(
                t.boxes == d.boxes && t.scores == d.scores && t.labels == d.labels,
                "image {i}: the traced run's detections differ from the box head's re-run"
            );
        }
    }
}

/// The box head's training samples (torchvision's `select_training_samples`) from
/// torchvision's training proposals and targets: the proposals with GT appended in
/// sampled order, labels exactly, regression targets within the stage tolerance.
fn check_roi_samples_on(device: Device) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let m = load_model(device);
    let il = image_list(&e, device);
    let orig = orig_sizes(&e);
    let targets: Vec<Target> = common::fixture_targets(&f)
        .iter()
        .enumerate()
        .map(|(i, t)| t.resized(orig[i], il.image_sizes[i]))
        .collect();
    let props = fixture_proposals(&f, targets.len(), device);
    let s = m
        .roi_heads
        .select_training_samples(&props, &targets, &mut Rng::new(0))
        .unwrap()
        .trimmed()
        .unwrap();
    assert_eq!(s.proposals.len(), targets.len(), "images sampled");
    for i in 0..targets.len() {
        assert_eq!(
            s.proposals[i].device(),
            device,
            "sampled RoIs stay on the device"
        );
        let (want_labels, _) = f.ints(&format!("roi.labels{i}")).unwrap();
        assert_eq!(s.labels[i], want_labels, "roi.labels{i}");
        assert_close(
            &format!("roi.sampled_proposals{i}"),
            &s.proposals[i],
            &f.tensor(&format!("roi.sampled_proposals{i}")).unwrap(),
            1e-5,
        );
        assert_close(
            &format!("roi.regression_targets{i}"),
            &s.regression_targets[i],
            &f.tensor(&format!("roi.regression_targets{i}")).unwrap(),
            STAGE_TOL,
        );
    }
}

/// One training step on torchvision's proposals (see the module docs): the set of
/// loss names is the fixture's, each loss within 1e-4, and every gradient the fixture
/// holds is produced and within 1e-3 (no parameter trained by torchvision is skipped).
fn check_training_on(device: Device) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let m = load_model(device);
    let imgs = images(&e, device);
    let targets = common::fixture_targets(&f);
    assert_eq!(targets.len(), imgs.len(), "one target per image");
    let props = fixture_proposals(&f, imgs.len(), device);
    let tape = Tape::new();
    let names = m.params.trainable_names();
    for n in &names {
        tape.watch(m.params.get(n).unwrap());
    }
    let ctx = Ctx::new(&m.params, true);
    let losses = {
        let _g = tape.activate();
        m.losses_with_proposals(&ctx, &imgs, &targets, &props, &mut Rng::new(0))
            .unwrap()
    };
    let mut got_names: Vec<String> = losses.iter().map(|(n, _)| n.clone()).collect();
    got_names.sort();
    let want_names: Vec<String> = f.params().unwrap()["loss_names"]
        .as_array()
        .expect("loss_names in the train fixture's params")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got_names, want_names, "loss names");
    for (name, v) in &losses {
        let want = f
            .tensor(&format!("loss.{name}"))
            .unwrap()
            .to_vec::<f64>()
            .unwrap()[0];
        let got = v.item().unwrap();
        assert!(
            ((got - want) / want).abs() <= 1e-4,
            "{name}: {got} vs torchvision {want}"
        );
    }
    let total = {
        let _g = tape.activate();
        let mut total = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            total = kestrel::ops::add(&total, l).unwrap();
        }
        total
    };
    let grads = tape.backward(&total).unwrap();
    let keys: Vec<String> = f
        .names()
        .into_iter()
        .filter(|k| k.starts_with("grad."))
        .collect();
    assert!(!keys.is_empty(), "the train fixture holds no gradients");
    for key in &keys {
        let n = &key["grad.".len()..];
        let p = m.params.get(n).unwrap_or_else(|e| {
            panic!("torchvision trains {n}, the engine has no such parameter: {e}")
        });
        assert!(
            names.contains(&n.to_string()),
            "{n} is not trainable in the engine"
        );
        let g = grads
            .get(p)
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        assert_close(key, g, &f.tensor(key).unwrap(), 1e-3);
    }
}

#[test]
fn stages_match_torchvision_cpu() {
    check_stages_on(Device::Cpu);
}

#[test]
fn detections_match_torchvision_end_to_end_cpu() {
    check_end_to_end_on(Device::Cpu);
}

#[test]
fn training_losses_and_gradients_match_torchvision_cpu() {
    check_training_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn stages_match_torchvision_cuda() {
    check_stages_on(common::cuda());
}

#[test]
#[ignore = "needs a CUDA device"]
fn detections_match_torchvision_end_to_end_cuda() {
    check_end_to_end_on(common::cuda());
}

#[test]
#[ignore = "needs a CUDA device"]
fn training_losses_and_gradients_match_torchvision_cuda() {
    check_training_on(common::cuda());
}

// The emulated CUDA device runs the real kernels on the CPU (slowly): the proposal
// stage and the box-head postprocess from the fixture's tensors, and the whole model.

fn emulated_model() -> (TensorFile, FasterRcnn, Device) {
    let device = common::emulated();
    (
        common::fixture("model/eval.safetensors"),
        load_model(device),
        device,
    )
}

#[test]
fn proposal_stage_matches_torchvision_emulated() {
    let (f, m, device) = emulated_model();
    check_proposal_stage(&f, &m, device);
}

#[test]
fn postprocess_stage_matches_torchvision_emulated() {
    let (f, m, device) = emulated_model();
    check_postprocess_stage(&f, &m, device);
}

#[test]
fn roi_training_samples_match_torchvision_cpu() {
    check_roi_samples_on(Device::Cpu);
}

#[test]
fn roi_training_samples_match_torchvision_emulated() {
    check_roi_samples_on(common::emulated());
}

#[test]
#[ignore = "needs a CUDA device"]
fn roi_training_samples_match_torchvision_cuda() {
    check_roi_samples_on(common::cuda());
}

#[test]
fn rpn_targets_match_torchvision_cpu() {
    check_rpn_targets_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn rpn_targets_match_torchvision_cuda() {
    check_rpn_targets_on(common::cuda());
}

#[test]
fn rpn_targets_match_torchvision_emulated() {
    check_rpn_targets_on(common::emulated());
}

#[test]
fn stages_match_torchvision_emulated() {
    check_stages_on(common::emulated());
}

#[test]
fn detections_match_torchvision_end_to_end_emulated() {
    check_end_to_end_on(common::emulated());
}

#[test]
fn training_losses_and_gradients_match_torchvision_emulated() {
    check_training_on(common::emulated());
}

#[test]
fn weights_with_a_missing_or_misshaped_tensor_are_refused() {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let cfg = FasterRcnnConfig::from_params(&file.params().unwrap()).unwrap();
    let mut wrong = cfg.clone();
    wrong.roi.num_classes += 1;
    let err = FasterRcnn::load(wrong, &path)
        .err()
        .expect("mis-shaped predictor accepted")
        .to_string();
    assert!(
        err.contains("roi_heads.box_predictor.cls_score.weight"),
        "{err}"
    );
    // One block more in the first stage than the file has: the first missing
    // tensor is that block's (index = the stage's block count in the fixture).
    let blocks = cfg.backbone.layers[0];
    let mut deeper = cfg;
    deeper.backbone.layers[0] += 1;
    let err = FasterRcnn::load(deeper, &path)
        .err()
        .expect("missing block accepted")
        .to_string();
    let missing = format!("missing `backbone.body.layer1.{blocks}.");
    assert!(err.contains(&missing), "{err} (expected {missing})");
}
