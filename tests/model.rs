//! Faster R-CNN parity with torchvision (fixtures/model), stage by stage, end to end,
//! and in training. The model is built from the configuration in the fixture's
//! `params`, so any fixture set made by make_fixtures.py runs unchanged.

mod common;

use common::assert_close;
use kestrel::autograd::Tape;
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
    assert_close(
        "roi.pooled",
        &pooled,
        &f.tensor("roi.pooled").unwrap(),
        STAGE_TOL,
    );
    let fpooled = on(f.tensor("roi.pooled").unwrap(), device);
    let h = m.roi_heads.box_head(&ctx, &fpooled).unwrap();
    assert_close("roi.head", &h, &f.tensor("roi.head").unwrap(), STAGE_TOL);
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
    for (i, p) in props.iter().enumerate() {
        let what = format!("rpn.proposals{i} (training {training})");
        assert_eq!(p.device(), device, "{what} device");
        let want = want_file.tensor(&format!("rpn.proposals{i}")).unwrap();
        assert_eq!(p.dims(), want.dims(), "{what} count");
        assert_close(&what, p, &want, 1e-5);
    }
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
        let want = fixture_dets(f, i);
        assert_eq!(d.labels, want.labels, "det{i} labels");
        let (gb, wb): (Vec<f64>, Vec<f64>) = (flat(&d.boxes), flat(&want.boxes));
        assert!(
            common::rel_err(&gb, &wb) <= STAGE_TOL,
            "det{i} boxes: {}",
            common::rel_err(&gb, &wb)
        );
        let (gs, ws): (Vec<f64>, Vec<f64>) = (
            d.scores.iter().map(|&v| v as f64).collect(),
            want.scores.iter().map(|&v| v as f64).collect(),
        );
        assert!(common::rel_err(&gs, &ws) <= STAGE_TOL, "det{i} scores");
    }
}

/// The fixture's training targets, in original image pixels.
fn fixture_targets(f: &TensorFile) -> Vec<Target> {
    (0..)
        .take_while(|i| f.contains(&format!("target{i}.boxes")))
        .map(|i| {
            let b = f
                .tensor(&format!("target{i}.boxes"))
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            Target {
                boxes: b
                    .chunks_exact(4)
                    .map(|c| [c[0], c[1], c[2], c[3]])
                    .collect(),
                labels: f.ints(&format!("target{i}.labels")).unwrap().0,
            }
        })
        .collect()
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
    for (i, t) in fixture_targets(&f).iter().enumerate() {
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

fn flat(b: &[[f32; 4]]) -> Vec<f64> {
    b.iter().flatten().map(|&v| v as f64).collect()
}

fn orig_sizes(f: &TensorFile) -> Vec<(usize, usize)> {
    f.params().unwrap()["original_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn fixture_dets(f: &TensorFile, i: usize) -> Detections {
    let b = f
        .tensor(&format!("det{i}.boxes"))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    Detections {
        boxes: b
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
        scores: f
            .tensor(&format!("det{i}.scores"))
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        labels: f.ints(&format!("det{i}.labels")).unwrap().0,
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    w * h / (area(a) + area(b) - w * h)
}

fn check_end_to_end_on(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model(device);
    let dets = m.detect(&images(&f, device)).unwrap();
    for (i, d) in dets.iter().enumerate() {
        let want = fixture_dets(&f, i);
        // Greedy matching: IoU > 0.99, same label, score within 1e-3.
        let mut used = vec![false; d.boxes.len()];
        let mut matched = 0;
        for k in 0..want.boxes.len() {
            let hit = (0..d.boxes.len()).find(|&j| {
                !used[j]
                    && d.labels[j] == want.labels[k]
                    && (d.scores[j] - want.scores[k]).abs() <= 1e-3
                    && iou(&d.boxes[j], &want.boxes[k]) > 0.99
            });
            if let Some(j) = hit {
                used[j] = true;
                matched += 1;
            }
        }
        let frac = matched as f64 / want.boxes.len().max(1) as f64;
        assert!(
            frac >= 0.98,
            "image {i}: {matched} of {} torchvision detections matched ({} found)",
            want.boxes.len(),
            d.boxes.len()
        );
    }
}

fn check_training_on(device: Device) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let m = load_model(device);
    let imgs = images(&e, device);
    let targets = fixture_targets(&f);
    assert_eq!(targets.len(), imgs.len(), "one target per image");
    let tape = Tape::new();
    let names = m.params.trainable_names();
    for n in &names {
        tape.watch(m.params.get(n).unwrap());
    }
    let ctx = Ctx::new(&m.params, true);
    let losses = {
        let _g = tape.activate();
        m.losses(&ctx, &imgs, &targets, &mut Rng::new(0)).unwrap()
    };
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
    let mut checked = 0;
    for n in &names {
        let key = format!("grad.{n}");
        if !f.contains(&key) {
            continue;
        }
        let g = grads
            .get(m.params.get(n).unwrap())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        assert_close(&key, g, &f.tensor(&key).unwrap(), 1e-3);
        checked += 1;
    }
    assert!(checked > 10, "only {checked} parameter gradients compared");
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
    let mut deeper = cfg;
    deeper.backbone.layers[0] += 1;
    let err = FasterRcnn::load(deeper, &path)
        .err()
        .expect("missing block accepted")
        .to_string();
    assert!(err.contains("missing `backbone.body.layer1.1."), "{err}");
}
