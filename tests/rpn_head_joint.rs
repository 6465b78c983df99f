//! The RPN head's CPU paths. Inference: the 3x3 conv with the objectness and
//! box-delta 1x1 convs run as one conv on each output tile of the 3x3 conv
//! (`Rpn::head` without a tape). Training: the 3x3 conv with bias and ReLU in its
//! epilogue (`ops::conv2d_bias_relu`) and both 1x1 convs as one 5A-channel conv
//! (`Rpn::head` with a tape). Each is checked against the unfused layers (the 3x3
//! conv, ReLU, then each 1x1 conv on the stored map, written out here), against
//! torchvision's head outputs, after the head's weights are replaced, and the
//! training path's gradients against the unfused layers' gradients.

mod common;

use common::assert_close;
use kestrel::autograd::Tape;
use kestrel::detection::rpn::RpnHeadOutput;
use kestrel::detection::{FasterRcnn, FasterRcnnConfig};
use kestrel::io::TensorFile;
use kestrel::nn::Ctx;
use kestrel::ops::conv2d::{conv2d, Conv2dParams};
use kestrel::ops::{self, Epilogue};
use kestrel::rng::Rng;
use kestrel::Tensor;

fn load_model() -> FasterRcnn {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let cfg = FasterRcnnConfig::from_params(&params).unwrap();
    FasterRcnn::load(cfg, &path).unwrap()
}

/// The fixture's FPN feature maps (torchvision's), level by level, as tests/model.rs
/// reads them.
fn fixture_features(f: &TensorFile) -> Vec<Tensor> {
    let mut names: Vec<String> = (0..)
        .map(|i| format!("features.{i}"))
        .take_while(|n| f.contains(n))
        .collect();
    names.push("features.pool".into());
    names.iter().map(|n| f.tensor(n).unwrap()).collect()
}

/// The head's parameters: 3x3 weight and bias, objectness weight and bias, delta
/// weight and bias.
fn head_params(m: &FasterRcnn) -> [Tensor; 6] {
    [
        "rpn.head.conv.0.0.weight",
        "rpn.head.conv.0.0.bias",
        "rpn.head.cls_logits.weight",
        "rpn.head.cls_logits.bias",
        "rpn.head.bbox_pred.weight",
        "rpn.head.bbox_pred.bias",
    ]
    .map(|n| m.params.get(n).unwrap().clone())
}

/// The head through the unfused layers, written out: the 3x3 conv (bias), ReLU,
/// then each 1x1 conv on the stored map.
fn head_layers(p: &[Tensor; 6], feats: &[Tensor]) -> RpnHeadOutput {
    let (p3, p1) = (Conv2dParams::new(1, 1, 1), Conv2dParams::default());
    let mut out = RpnHeadOutput {
        objectness: Vec::new(),
        deltas: Vec::new(),
    };
    for f in feats {
        let t = ops::relu(&conv2d(f, &p[0], Some(&p[1]), &p3).unwrap()).unwrap();
        out.objectness
            .push(conv2d(&t, &p[2], Some(&p[3]), &p1).unwrap());
        out.deltas
            .push(conv2d(&t, &p[4], Some(&p[5]), &p1).unwrap());
    }
    out
}

fn head_unfused(m: &FasterRcnn, _ctx: &Ctx, feats: &[Tensor]) -> RpnHeadOutput {
    head_layers(&head_params(m), feats)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

/// Largest difference between the joint and the unfused head, over levels.
fn head_diff(a: &RpnHeadOutput, b: &RpnHeadOutput) -> f64 {
    assert_eq!(a.objectness.len(), b.objectness.len());
    let o = a.objectness.iter().zip(&b.objectness);
    let d = a.deltas.iter().zip(&b.deltas);
    o.chain(d)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f64::max)
}

/// Scale of the head's outputs, for the tolerance below.
fn head_scale(a: &RpnHeadOutput) -> f64 {
    a.objectness
        .iter()
        .chain(&a.deltas)
        .flat_map(|t| t.to_vec::<f32>().unwrap())
        .map(|v| v.abs() as f64)
        .fold(0.0, f64::max)
}

// Both paths sum the same products; only the GEMM's blocking (tile widths) may
// order them differently, a few f32 ulps of the largest partial sums. Measured on
// the development machine (AVX-512): 0, bit-equal, in every case below.
const REL_TOL: f64 = 1e-5;

#[test]
fn joint_head_matches_the_unfused_layers_and_torchvision() {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model();
    let ctx = Ctx::new(&m.params, false);
    let feats = fixture_features(&f);
    let joint = m.rpn.head(&ctx, &feats).unwrap();
    let plain = head_unfused(&m, &ctx, &feats);
    let (diff, scale) = (head_diff(&joint, &plain), head_scale(&plain));
    println!("joint vs unfused head: max |diff| {diff:.3e}, max |output| {scale:.3e}");
    assert!(
        diff <= REL_TOL * scale.max(1.0),
        "joint head differs from the unfused layers by {diff:e} (outputs up to {scale:e})"
    );
    for (i, (o, d)) in joint.objectness.iter().zip(&joint.deltas).enumerate() {
        assert_close(
            &format!("rpn.objectness{i}"),
            o,
            &f.tensor(&format!("rpn.objectness{i}")).unwrap(),
            1e-4,
        );
        assert_close(
            &format!("rpn.deltas{i}"),
            d,
            &f.tensor(&format!("rpn.deltas{i}")).unwrap(),
            1e-4,
        );
    }
}

#[test]
fn joint_head_follows_replaced_weights() {
    let f = common::fixture("model/eval.safetensors");
    let mut m = load_model();
    let feats = fixture_features(&f);
    let before = {
        let ctx = Ctx::new(&m.params, false);
        m.rpn.head(&ctx, &feats).unwrap()
    };
    // A new version of each 1x1 weight and bias (as an optimizer step makes): the
    // joint weights cached from the first call must be remade.
    let mut rng = Rng::new(7);
    for name in [
        "rpn.head.cls_logits.weight",
        "rpn.head.cls_logits.bias",
        "rpn.head.bbox_pred.weight",
        "rpn.head.bbox_pred.bias",
    ] {
        let t = m.params.get(name).unwrap();
        let v: Vec<f32> = (0..t.numel())
            .map(|_| rng.range(-0.05, 0.05) as f32)
            .collect();
        let new = Tensor::from_vec(v, t.dims().to_vec()).unwrap();
        m.params.set(name, new).unwrap();
    }
    let ctx = Ctx::new(&m.params, false);
    let joint = m.rpn.head(&ctx, &feats).unwrap();
    let plain = head_unfused(&m, &ctx, &feats);
    let (diff, scale) = (head_diff(&joint, &plain), head_scale(&plain));
    assert!(
        diff <= REL_TOL * scale.max(1.0),
        "after new weights the joint head differs from the unfused layers by {diff:e}"
    );
    assert!(
        head_diff(&joint, &before) > 1e-3,
        "the joint head still gives the old weights' outputs"
    );
}

fn uniform(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, shape.to_vec()).unwrap()
}

/// The op alone on shapes whose column chunks are ragged (not whole vector lanes)
/// and several per image, two images, against conv + ReLU then the 1x1 conv.
#[test]
fn pointwise_head_op_matches_two_convs() {
    for (n, cin, h, w, cout, c2) in [(2, 8, 13, 17, 16, 15), (1, 64, 40, 50, 32, 7)] {
        let x = uniform(&[n, cin, h, w], 1);
        let wt = uniform(&[cout, cin, 3, 3], 2);
        let b = uniform(&[cout], 3);
        let w2 = uniform(&[c2, cout, 1, 1], 4);
        let b2 = uniform(&[c2], 5);
        let p = Conv2dParams::new(1, 1, 1);
        let ep = Epilogue {
            shift: Some(&b),
            relu: true,
            ..Default::default()
        };
        let t = ops::conv2d_fused(&x, &wt, &p, &ep).unwrap();
        let want = conv2d(&t, &w2, Some(&b2), &Conv2dParams::default()).unwrap();
        let split = c2 / 3;
        let got = kestrel::ops::conv2d::conv2d_relu_pointwise_cpu(
            &x,
            (&wt, Some(&b)),
            &p,
            (&w2, Some(&b2)),
            &[split, c2 - split],
        )
        .unwrap();
        let want_a = ops::narrow(&want, 1, 0, split).unwrap();
        let want_b = ops::narrow(&want, 1, split, c2 - split).unwrap();
        let scale = want
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .fold(0f32, |m, v| m.max(v.abs())) as f64;
        for (g, want) in got.iter().zip([&want_a, &want_b]) {
            let d = max_abs_diff(g, want);
            println!(
                "[{n}, {cin}, {h}, {w}] -> {:?}: max |diff| {d:.3e} of {scale:.3e}",
                want.dims()
            );
            assert!(
                d <= REL_TOL * scale,
                "joint op differs by {d:e} (outputs up to {scale:e})"
            );
        }
    }
}

#[test]
fn pointwise_head_op_rejects_mismatched_shapes() {
    let x = uniform(&[1, 8, 9, 9], 1);
    let wt = uniform(&[16, 8, 3, 3], 2);
    let p = Conv2dParams::new(1, 1, 1);
    // Splits summing to 15 for a 14-channel second weight.
    let w2 = uniform(&[14, 16, 1, 1], 4);
    let e =
        kestrel::ops::conv2d::conv2d_relu_pointwise_cpu(&x, (&wt, None), &p, (&w2, None), &[3, 12])
            .unwrap_err();
    assert!(e.to_string().contains("second weight"), "{e}");
    // A second weight reading 8 channels of a 16-channel map.
    let w2 = uniform(&[15, 8, 1, 1], 4);
    assert!(kestrel::ops::conv2d::conv2d_relu_pointwise_cpu(
        &x,
        (&wt, None),
        &p,
        (&w2, None),
        &[3, 12]
    )
    .is_err());
}

#[test]
fn pointwise_head_op_refuses_a_tape() {
    let x = uniform(&[1, 8, 9, 9], 1);
    let wt = uniform(&[16, 8, 3, 3], 2);
    let w2 = uniform(&[15, 16, 1, 1], 4);
    let tape = Tape::new();
    let _on = tape.activate();
    let p = Conv2dParams::new(1, 1, 1);
    let e =
        kestrel::ops::conv2d::conv2d_relu_pointwise_cpu(&x, (&wt, None), &p, (&w2, None), &[3, 12])
            .unwrap_err();
    assert!(e.to_string().contains("tape"), "{e}");
}

/// `sum(objectness * ro) + sum(deltas * rd)` with fixed random `ro`, `rd`: a loss
/// whose gradient reaches every output element with a different weight.
fn weighted_sum(h: &RpnHeadOutput) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (i, t) in h.objectness.iter().chain(&h.deltas).enumerate() {
        let r = uniform(t.dims(), 100 + i as u64);
        let s = ops::sum(&ops::mul(t, &r).unwrap()).unwrap();
        total = Some(match total {
            None => s,
            Some(a) => ops::add(&a, &s).unwrap(),
        });
    }
    total.unwrap()
}

/// The training head (a tape records: fused 3x3 conv + bias + ReLU, one joint 1x1
/// conv, split) gives the unfused layers' outputs and the same gradients for the
/// features and all six head tensors, on torchvision's fixture features.
#[test]
fn training_head_matches_the_unfused_layers_and_their_gradients() {
    let f = common::fixture("model/eval.safetensors");
    let m = load_model();
    let feats = fixture_features(&f);
    let params = head_params(&m);
    // One pass per path, each on its own tape watching the same tensors.
    let run = |train_path: bool| {
        let tape = Tape::new();
        for t in feats.iter().chain(&params) {
            tape.watch(t);
        }
        let (head, loss) = {
            let _on = tape.activate();
            let head = if train_path {
                let ctx = Ctx::new(&m.params, true);
                m.rpn.head(&ctx, &feats).unwrap()
            } else {
                head_layers(&params, &feats)
            };
            let loss = weighted_sum(&head);
            (head, loss)
        };
        let grads = tape.backward(&loss).unwrap();
        let g: Vec<Tensor> = feats
            .iter()
            .chain(&params)
            .map(|t| grads.get(t).expect("a gradient for every input").clone())
            .collect();
        (head, g)
    };
    let (fused, g_fused) = run(true);
    let (plain, g_plain) = run(false);
    let (diff, scale) = (head_diff(&fused, &plain), head_scale(&plain));
    println!("training vs unfused head: max |diff| {diff:.3e}, max |output| {scale:.3e}");
    assert!(
        diff <= REL_TOL * scale.max(1.0),
        "training head differs from the unfused layers by {diff:e} (outputs up to {scale:e})"
    );
    let names = (0..feats.len()).map(|i| format!("features.{i}")).chain(
        [
            "conv.weight",
            "conv.bias",
            "cls.weight",
            "cls.bias",
            "bbox.weight",
            "bbox.bias",
        ]
        .map(String::from),
    );
    for ((name, a), b) in names.zip(&g_fused).zip(&g_plain) {
        let d = max_abs_diff(a, b);
        let s = b
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .fold(0f64, |m, v| m.max(v.abs() as f64));
        println!("grad {name}: max |diff| {d:.3e} of {s:.3e}");
        assert!(
            s > 0.0 && d <= 1e-4 * s,
            "gradient of {name} differs by {d:e} (values up to {s:e})"
        );
    }
}
