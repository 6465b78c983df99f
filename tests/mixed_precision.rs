//! Mixed precision (bf16) end to end against torchvision's f32 fixtures
//! (fixtures/model), on the CPU (bf16 by rounding: the reference) and on the emulated
//! device (the tensor-core kernels).
//!
//! Tolerances are derived, not tuned. A bf16 value carries a relative rounding error
//! of at most u = 2^-8 (8 significant bits, round to nearest even); modelled as
//! independent and uniform, each rounding has an rms relative error of u/sqrt(3). A
//! conv or linear layer on the tensor-core path rounds its input, its weight and (for
//! a bf16 output) its output: three roundings, rms relative error u per layer; the f32
//! accumulation adds K * 2^-24, negligible beside u for every K of the model (at most
//! 12544 = 2^13.6: 2^-10.4 worst case, summed in the same order as the reference
//! only up to reassociation, so far below it in practice). Through D such layers the
//! independent errors add in quadrature: rms u * sqrt(D) in the relative norm
//! ||got - want|| / ||want|| that `assert_close` measures. The tolerance of a stage is
//! 4 u sqrt(D): the factor 4 leaves room for errors that are not independent (a ReLU
//! passes or stops an error with its sign; residual sums correlate branches) while
//! keeping the test able to fail: a layer run on an unrounded f32 path or a wrong
//! weight gives errors of order 1, and an f32 reference lies ~10^4 below (see the
//! printed measurements). D is counted per stage from the fixture's own inputs.
//! Stages that the policy keeps in f32 (RoIAlign, proposals, postprocess) keep the f32
//! tolerance of tests/model.rs.

mod common;

use common::{fixture_dets, iou, orig_sizes};

use common::assert_close;
use kestrel::autograd::Tape;
use kestrel::detection::transform::image_from_u8;
use kestrel::detection::{Detections, FasterRcnn, FasterRcnnConfig, Target};
use kestrel::io::TensorFile;
use kestrel::nn::Precision;
use kestrel::ops::mixed;
use kestrel::rng::Rng;
use kestrel::tensor::DType;
use kestrel::{Device, Tensor};

/// Unit roundoff of bf16.
const U: f64 = 1.0 / 256.0;
/// f32 stages: the tolerance of tests/model.rs.
const F32_TOL: f64 = 1e-4;

/// The tolerance of a stage whose longest path crosses `d` bf16 layers (module doc).
fn tol(d: usize) -> f64 {
    4.0 * U * (d as f64).sqrt()
}

fn load_model(device: Device, precision: Precision) -> FasterRcnn {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let mut cfg = FasterRcnnConfig::from_params(&params).unwrap();
    let train = common::fixture("model/train.safetensors");
    let tp = train.params().unwrap();
    cfg.rpn.batch_size_per_image = tp["rpn_batch_size_per_image"].as_u64().unwrap() as usize;
    cfg.roi.batch_size_per_image = tp["box_batch_size_per_image"].as_u64().unwrap() as usize;
    let mut m = FasterRcnn::load(cfg, &path).unwrap();
    m.to_device(device).unwrap();
    m.set_precision(precision);
    m
}

/// bf16 layers on the longest path of the backbone + FPN: the stem, every conv of the
/// main branch of each block, the FPN's inner and output convs.
fn feature_depth(m: &FasterRcnn) -> usize {
    let b = &m.config.backbone;
    let per_block = match b.block {
        kestrel::nn::resnet::BlockKind::Basic => 2,
        kestrel::nn::resnet::BlockKind::Bottleneck => 3,
    };
    1 + per_block * b.layers.iter().sum::<usize>() + 2
}

fn on(t: Tensor, d: Device) -> Tensor {
    t.to_device(d).unwrap()
}

fn images(f: &TensorFile, device: Device) -> Vec<Tensor> {
    (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            on(image_from_u8(&bytes, s.dim(1), s.dim(2)).unwrap(), device)
        })
        .collect()
}

fn feature_names(f: &TensorFile) -> Vec<String> {
    let mut v: Vec<String> = (0..)
        .map(|i| format!("features.{i}"))
        .take_while(|n| f.contains(n))
        .collect();
    v.push("features.pool".into());
    v
}

fn f32_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(Device::Cpu)
        .unwrap()
}

/// `assert_close` on the f32 value of `got`, printing the measured error.
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (g, w) = (
        f32_of(got).to_vec::<f64>().unwrap(),
        want.to_vec::<f64>().unwrap(),
    );
    eprintln!(
        "{what}: relative error {:.3e} (tolerance {tol:.3e})",
        common::rel_err(&g, &w)
    );
    assert_close(what, &f32_of(got), want, tol);
}

fn check_stages_bf16(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model(device, Precision::Bf16);
    let ctx = m.ctx(false);
    let (sizes, _) = f.ints("transform.image_sizes").unwrap();
    let image_sizes: Vec<(usize, usize)> = sizes
        .chunks(2)
        .map(|s| (s[0] as usize, s[1] as usize))
        .collect();
    let batch = on(f.tensor("transform.batch").unwrap(), device);

    // Backbone + FPN: bf16 activations between the layers.
    let feats = m.features(&ctx, &batch).unwrap();
    let names = feature_names(&f);
    assert_eq!(feats.len(), names.len());
    let d = feature_depth(&m);
    for (got, n) in feats.iter().zip(&names) {
        assert_eq!(got.dtype(), DType::BF16, "{n} is a bf16 activation");
        check(n, got, &f.tensor(n).unwrap(), tol(d));
    }

    // RPN head from the fixture's (f32) features: the 3x3 conv (bf16 out), then the
    // objectness / delta convs (f32 out): 2 layers.
    let ffeats: Vec<Tensor> = names
        .iter()
        .map(|n| on(f.tensor(n).unwrap(), device))
        .collect();
    let head = m.rpn.head(&ctx, &ffeats).unwrap();
    for (i, (o, dl)) in head.objectness.iter().zip(&head.deltas).enumerate() {
        assert_eq!(
            o.dtype(),
            DType::F32,
            "objectness feeds proposal scores: f32"
        );
        assert_eq!(dl.dtype(), DType::F32, "deltas feed box coding: f32");
        let n = format!("rpn.objectness{i}");
        check(&n, o, &f.tensor(&n).unwrap(), tol(2));
        let n = format!("rpn.deltas{i}");
        check(&n, dl, &f.tensor(&n).unwrap(), tol(2));
    }

    // RoIAlign of f32 features stays f32: the f32 tolerance.
    let fprops: Vec<Tensor> = (0..image_sizes.len())
        .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect();
    let pooled = m
        .roi_heads
        .pool(&ffeats[..4], &fprops, &image_sizes)
        .unwrap();
    assert_eq!(pooled.dtype(), DType::F32, "RoIAlign accumulates in f32");
    let rows = f.contains("roi.pooled_rows").then(|| {
        let (r, _) = f.ints("roi.pooled_rows").unwrap();
        Tensor::from_vec_i64(r.clone(), [r.len()]).unwrap()
    });
    let pooled = match &rows {
        Some(r) => kestrel::ops::index_select(&pooled, 0, &on(r.clone(), device)).unwrap(),
        None => pooled,
    };
    check(
        "roi.pooled",
        &pooled,
        &f.tensor("roi.pooled").unwrap(),
        F32_TOL,
    );

    // Box head (fc6, fc7: 2 layers) and predictor (1 layer, f32 out).
    let fpooled = on(f.tensor("roi.pooled").unwrap(), device);
    let h = m.roi_heads.box_head(&ctx, &fpooled).unwrap();
    assert_eq!(
        h.dtype(),
        DType::BF16,
        "the box head's output is an activation"
    );
    let want_head = f.tensor("roi.head").unwrap();
    let want_head = match &rows {
        Some(r) => kestrel::ops::index_select(&want_head, 0, r).unwrap(),
        None => want_head,
    };
    check("roi.head", &h, &want_head, tol(2));
    let (cl, br) = m
        .roi_heads
        .predictor(&ctx, &on(f.tensor("roi.head").unwrap(), device))
        .unwrap();
    assert_eq!(cl.dtype(), DType::F32, "class logits feed softmax: f32");
    check(
        "roi.class_logits",
        &cl,
        &f.tensor("roi.class_logits").unwrap(),
        tol(1),
    );
    check(
        "roi.box_regression",
        &br,
        &f.tensor("roi.box_regression").unwrap(),
        tol(1),
    );
}

/// Bound on a detection score's change in bf16 from torchvision's proposals: the
/// class logits come D = 3 bf16 layers after the f32 RoIAlign (fc6, fc7, predictor),
/// relative error tol(3); softmax moves a probability by at most 1/2 of the largest
/// logit change, and the fixture's logits are below 2 in magnitude, so the score
/// changes by less than tol(3).
fn score_delta() -> f64 {
    tol(3)
}

/// Whether detection `k` of `a`, absent from `b`, is explained by a near-tie that
/// bf16's rounding may flip: `b` kept a same-label box that overlaps it beyond the
/// NMS threshold (0.5) with a score within [`score_delta`] (per-class NMS kept the
/// other of the pair), or `b` is full (100) and `a`'s score is within it of `b`'s
/// lowest (the top-100 cut).
fn near_tie(a: &Detections, k: usize, b: &Detections) -> bool {
    let d = score_delta() as f32;
    let swapped = (0..b.scores.len()).any(|j| {
        b.labels[j] == a.labels[k]
            && iou(&b.boxes[j], &a.boxes[k]) > 0.5
            && (b.scores[j] - a.scores[k]).abs() <= d
    });
    let cut = b.scores.len() == 100
        && b.scores.iter().fold(f32::INFINITY, |m, &s| m.min(s)) + d >= a.scores[k];
    swapped || cut
}

/// Every detection of `a` scoring above 0.5 has one in `b` (any score: a score near
/// 0.5 may cross it in bf16) with the same label and every coordinate within 1 px,
/// unless its absence is a near-tie flip ([`near_tie`]), which is counted and printed.
fn confident_found_in(what: &str, a: &Detections, b: &Detections) -> usize {
    let mut n = 0;
    for k in 0..a.scores.len() {
        if a.scores[k] <= 0.5 {
            continue;
        }
        n += 1;
        // The largest coordinate difference to the nearest same-label detection.
        let nearest = (0..b.scores.len())
            .filter(|&j| b.labels[j] == a.labels[k])
            .map(|j| {
                let d = (0..4)
                    .map(|c| (b.boxes[j][c] - a.boxes[k][c]).abs())
                    .fold(0.0f32, f32::max);
                (d, j)
            })
            .min_by(|x, y| x.0.total_cmp(&y.0));
        if nearest.is_some_and(|(d, _)| d <= 1.0) {
            continue;
        }
        if near_tie(a, k, b) {
            eprintln!(
                "{what}: detection {k} (label {}, score {:.4}) absent by a near-tie flip",
                a.labels[k], a.scores[k]
            );
            continue;
        }
        panic!(
            "{what}: detection {k} (label {}, score {}, box {:?}) has no match within 1 px \
             (nearest same-label detection: {nearest:?})",
            a.labels[k], a.scores[k], a.boxes[k]
        );
    }
    n
}

/// Images to detections in bf16. The RPN's proposal list is a discrete choice: among
/// proposals whose objectness differs by less than bf16's rounding (the fixture model
/// has many near-equal ones), top-k and NMS may keep others, and a detection then
/// comes from another proposal. So the box head runs on torchvision's proposals (the
/// bf16 backbone, FPN features and box head are all still used) and every confident
/// detection must be torchvision's within 1 px with its label, both ways. The
/// detections from the engine's own bf16 proposals are compared the same way and
/// reported (how many of torchvision's confident detections they contain), not
/// asserted.
fn check_detections_bf16(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model(device, Precision::Bf16);
    let trace = kestrel::autograd::no_grad(|| m.detect_traced(&images(&f, device))).unwrap();
    let fprops: Vec<Tensor> = (0..trace.proposals.len())
        .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect();
    let ctx = m.ctx(false);
    let from_tv =
        kestrel::autograd::no_grad(|| m.detect_from(&ctx, &trace.images, &trace.features, &fprops))
            .unwrap();
    let orig = orig_sizes(&f);
    for (i, d) in from_tv.into_iter().enumerate() {
        let got = d.resized(trace.images.image_sizes[i], orig[i]).unwrap();
        let want = fixture_dets(&f, i);
        let n = confident_found_in(&format!("image {i}: torchvision's"), &want, &got);
        confident_found_in(&format!("image {i}: bf16"), &got, &want);
        eprintln!(
            "image {i}: {n} confident torchvision detections, each found in bf16 or absent by a near-tie flip"
        );
        assert!(
            n > 0 || want.scores.iter().all(|&s| s <= 0.5),
            "image {i}: nothing compared"
        );
    }
    for (i, got) in trace.detections.iter().enumerate() {
        let want = fixture_dets(&f, i);
        let (mut n, mut found) = (0, 0);
        for k in (0..want.scores.len()).filter(|&k| want.scores[k] > 0.5) {
            n += 1;
            found += (0..got.scores.len()).any(|j| {
                got.labels[j] == want.labels[k]
                    && (0..4).all(|c| (got.boxes[j][c] - want.boxes[k][c]).abs() <= 1.0)
            }) as usize;
        }
        eprintln!(
            "image {i}, bf16 proposals: {found} of {n} confident torchvision detections \
             within 1 px (reported, not asserted: see above)"
        );
    }
}

/// One training step on torchvision's proposals in bf16: losses and the gradients of
/// every parameter torchvision trains, within the derived tolerances. Loss depth: the
/// box branch's path (backbone + FPN, box head fc6 and fc7, predictor). Gradient depth:
/// that path forward, back through every dgrad (which rounds the f32 upstream gradient
/// and the weight), and the wgrad: 2 D + 1.
fn check_training_bf16(device: Device) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let m = load_model(device, Precision::Bf16);
    let imgs = images(&e, device);
    let targets: Vec<Target> = common::fixture_targets(&f);
    let props: Vec<Tensor> = (0..imgs.len())
        .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
        .collect();
    let tape = Tape::new();
    let names = m.params.trainable_names();
    for n in &names {
        tape.watch(m.params.get(n).unwrap());
    }
    let ctx = m.ctx(true);
    let losses = {
        let _g = tape.activate();
        m.losses_with_proposals(&ctx, &imgs, &targets, &props, &mut Rng::new(0))
            .unwrap()
    };
    let depth = feature_depth(&m) + 3;
    for (name, v) in &losses {
        assert_eq!(v.dtype(), DType::F32, "{name} is f32");
        let want = f
            .tensor(&format!("loss.{name}"))
            .unwrap()
            .to_vec::<f64>()
            .unwrap()[0];
        let got = v.item().unwrap();
        let e = ((got - want) / want).abs();
        eprintln!(
            "{name}: {got} vs torchvision {want}: {e:.3e} (tolerance {:.3e})",
            tol(depth)
        );
        assert!(e <= tol(depth), "{name}: {got} vs torchvision {want}");
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
    assert!(!keys.is_empty());
    let gtol = tol(2 * depth + 1);
    let mut worst = 0.0f64;
    for key in &keys {
        let n = &key["grad.".len()..];
        let p = m.params.get(n).unwrap();
        assert_eq!(p.dtype(), DType::F32, "{n}: master weights are f32");
        let g = grads
            .get(p)
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        assert_eq!(g.dtype(), DType::F32, "{n}: parameter gradients are f32");
        let want = f.tensor(key).unwrap();
        let err = common::rel_err(&g.to_vec::<f64>().unwrap(), &want.to_vec::<f64>().unwrap());
        worst = worst.max(err);
        assert_close(key, g, &want, gtol);
    }
    eprintln!(
        "{} gradients: worst relative error {worst:.3e} (tolerance {gtol:.3e})",
        keys.len()
    );
}

#[test]
fn bf16_stages_match_torchvision_cpu() {
    check_stages_bf16(Device::Cpu);
}

#[test]
fn bf16_stages_match_torchvision_emulated() {
    common::on_emulated(check_stages_bf16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_stages_match_torchvision_cuda() {
    check_stages_bf16(common::cuda());
}

#[test]
fn bf16_confident_detections_match_torchvision_cpu() {
    check_detections_bf16(Device::Cpu);
}

#[test]
fn bf16_confident_detections_match_torchvision_emulated() {
    common::on_emulated(check_detections_bf16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_confident_detections_match_torchvision_cuda() {
    check_detections_bf16(common::cuda());
}

#[test]
fn bf16_training_step_matches_torchvision_cpu() {
    check_training_bf16(Device::Cpu);
}

#[test]
fn bf16_training_step_matches_torchvision_emulated() {
    common::on_emulated(check_training_bf16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_training_step_matches_torchvision_cuda() {
    check_training_bf16(common::cuda());
}

/// The policy: a bf16 activation mixed with an f32 one is an error naming the op, on
/// both devices; one dtype throughout is accepted and computed in f32 (CPU: rounded
/// back to bf16, equal to the f32 op on the rounded values).
fn check_dtype_policy(device: Device) {
    let a = on(
        common::rand_t(1, &[2, 3, 4, 4])
            .to_dtype(DType::F32)
            .unwrap(),
        device,
    );
    let b = on(
        common::rand_t(2, &[2, 3, 4, 4])
            .to_dtype(DType::F32)
            .unwrap(),
        device,
    );
    let a16 = a.to_dtype(DType::BF16).unwrap();
    let b16 = b.to_dtype(DType::BF16).unwrap();
    common::assert_err("add bf16+f32", kestrel::ops::add(&a16, &b), "add");
    let top = on(
        common::rand_t(3, &[2, 3, 2, 2])
            .to_dtype(DType::F32)
            .unwrap(),
        device,
    );
    common::assert_err(
        "upsample_nearest_add bf16+f32",
        kestrel::ops::upsample_nearest_add(&a16, &top),
        "upsample_nearest_add",
    );
    // Same dtype: bf16 in, bf16 out, the f32 op on the rounded values, rounded.
    let want = |y: Tensor| f32_of(&y.to_dtype(DType::BF16).unwrap());
    let (a32, b32) = (f32_of(&a16), f32_of(&b16));
    let cases: Vec<(&str, Tensor, Tensor)> = vec![
        (
            "add",
            kestrel::ops::add(&a16, &b16).unwrap(),
            want(kestrel::ops::add(&a32, &b32).unwrap()),
        ),
        (
            "relu",
            kestrel::ops::relu(&a16).unwrap(),
            want(kestrel::ops::relu(&a32).unwrap()),
        ),
        (
            "max_pool2d",
            kestrel::ops::max_pool2d(&a16, 3, 2, 1).unwrap(),
            want(kestrel::ops::max_pool2d(&a32, 3, 2, 1).unwrap()),
        ),
        (
            "upsample_nearest_add",
            kestrel::ops::upsample_nearest_add(&a16, &top.to_dtype(DType::BF16).unwrap()).unwrap(),
            want(
                kestrel::ops::upsample_nearest_add(
                    &a32,
                    &f32_of(&top.to_dtype(DType::BF16).unwrap()),
                )
                .unwrap(),
            ),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got.dtype(), DType::BF16, "{what}: bf16 out");
        assert_eq!(
            f32_of(&got).to_vec::<f32>().unwrap(),
            want.to_vec::<f32>().unwrap(),
            "{what}"
        );
    }
}

#[test]
fn dtype_policy_cpu() {
    check_dtype_policy(Device::Cpu);
}

#[test]
fn dtype_policy_emulated() {
    common::on_emulated(check_dtype_policy);
}

/// The bf16 copies of the master weights are made once per weight version: a forward
/// copies every conv / linear weight once (the RPN head runs on five levels), a
/// second forward copies nothing, and after an SGD step exactly the trained weights
/// are copied again. The masters stay f32 and the step changes them.
#[test]
fn bf16_weight_copies_refresh_once_per_step() {
    let device = Device::Cpu;
    let f = common::fixture("model/eval.safetensors");
    let mut m = load_model(device, Precision::Bf16);
    let batch = on(f.tensor("transform.batch").unwrap(), device);
    let layer_weights = m
        .params
        .iter()
        .filter(|(n, t)| n.ends_with(".weight") && t.dims().len() >= 2)
        .count();
    let trained_weights = m
        .params
        .trainable_names()
        .iter()
        .filter(|n| n.ends_with(".weight") && m.params.get(n).unwrap().dims().len() >= 2)
        .count();
    assert!(trained_weights > 0 && trained_weights <= layer_weights);
    let fpn_and_rpn = |m: &FasterRcnn| {
        let ctx = m.ctx(false);
        let feats = m.features(&ctx, &batch).unwrap();
        m.rpn.head(&ctx, &feats).unwrap();
    };
    kestrel::autograd::no_grad(|| fpn_and_rpn(&m));
    // Every conv of the body, FPN and RPN (the box head did not run).
    let first = m.bf16_weights.refreshes();
    let box_head = 4;
    assert_eq!(first, layer_weights - box_head, "one copy per weight");
    kestrel::autograd::no_grad(|| fpn_and_rpn(&m));
    assert_eq!(
        m.bf16_weights.refreshes(),
        first,
        "no copy without a new weight"
    );
    // A step on every trained parameter (f32 gradients of ones).
    let names = m.params.trainable_names();
    let mut ps: Vec<Tensor> = names
        .iter()
        .map(|n| m.params.get(n).unwrap().clone())
        .collect();
    let gs: Vec<Tensor> = ps
        .iter()
        .map(|p| Tensor::full(p.shape().clone(), 1.0, DType::F32, device).unwrap())
        .collect();
    let before = ps[0].to_vec::<f32>().unwrap();
    let mut sgd = kestrel::optim::Sgd::new(Default::default()).unwrap();
    sgd.step(&mut ps, &gs).unwrap();
    for (n, p) in names.iter().zip(ps) {
        assert_eq!(p.dtype(), DType::F32, "{n}: master stays f32");
        m.params.set(n, p).unwrap();
    }
    assert_ne!(
        m.params.get(&names[0]).unwrap().to_vec::<f32>().unwrap(),
        before
    );
    kestrel::autograd::no_grad(|| fpn_and_rpn(&m));
    let trained_box_head = 4;
    assert_eq!(
        m.bf16_weights.refreshes() - first,
        trained_weights - trained_box_head,
        "after a step exactly the trained weights are copied again, once each"
    );
}

/// The recorded cast passes gradients through as f32.
#[test]
fn cast_gradient_is_f32() {
    let x = common::rand_t(5, &[3, 4]).to_dtype(DType::F32).unwrap();
    let (y, g) = common::run_with_grads(
        |v| {
            let h = mixed::cast(&v[0], DType::BF16)?;
            let h = kestrel::ops::relu(&h)?;
            kestrel::ops::sum(&mixed::cast(&h, DType::F32)?)
        },
        std::slice::from_ref(&x),
        &[0],
        None,
    );
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(g[0].dtype(), DType::F32);
    let want: Vec<f32> = x
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| {
            if half::bf16::from_f32(v).to_f32() > 0.0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    assert_eq!(g[0].to_vec::<f32>().unwrap(), want);
}

/// Measurement, not a check: peak device memory (the caching allocator's peak of
/// bytes in use) of the fixture model's training step (forward on torchvision's
/// proposals, losses, backward) at batch 2 on the emulated device, f32 then bf16.
#[test]
#[ignore = "measurement: prints peak device memory of a training step, f32 vs bf16"]
fn peak_memory_of_a_training_step_emulated() {
    let device = common::emulated();
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    for p in [Precision::F32, Precision::Bf16] {
        let m = load_model(device, p);
        let imgs = images(&e, device);
        let targets: Vec<Target> = common::fixture_targets(&f);
        let props: Vec<Tensor> = (0..imgs.len())
            .map(|i| on(f.tensor(&format!("rpn.proposals{i}")).unwrap(), device))
            .collect();
        device.reset_peak_memory();
        let base = device.memory().peak_allocated;
        let tape = Tape::new();
        for n in m.params.trainable_names() {
            tape.watch(m.params.get(&n).unwrap());
        }
        let ctx = m.ctx(true);
        let total = {
            let _g = tape.activate();
            let losses = m
                .losses_with_proposals(&ctx, &imgs, &targets, &props, &mut Rng::new(0))
                .unwrap();
            let mut t = losses[0].1.clone();
            for (_, l) in &losses[1..] {
                t = kestrel::ops::add(&t, l).unwrap();
            }
            t
        };
        let grads = tape.backward(&total).unwrap();
        let peak = device.memory().peak_allocated;
        eprintln!(
            "precision {p}: peak {:.1} MiB (parameters and inputs before the step {:.1} MiB), {} gradients",
            peak as f64 / 1048576.0,
            base as f64 / 1048576.0,
            grads.len()
        );
    }
}
