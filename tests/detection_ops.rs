//! Detection ops against torchvision (fixtures ops/boxes, ops/nms, ops/detection):
//! box ops, NMS, box coding, anchors, matcher, top-k, sampler; edge cases; CUDA
//! against the CPU on random inputs.
//!
//! Each `check_*_on(device)` runs the same checks on the CPU (plain tests) and on a
//! CUDA device (tests ignored with the reason "needs a CUDA device", run with `--include-ignored` where a GPU is present).

mod common;

use std::collections::BTreeSet;

use common::{assert_close, cuda, fixture};
use kestrel::detection::anchors::AnchorGenerator;
use kestrel::detection::box_coder::BoxCoder;
use kestrel::detection::matcher::Matcher;
use kestrel::detection::sampler::{BalancedPositiveNegativeSampler, Sampled};
use kestrel::io::TensorFile;
use kestrel::ops::{boxes, nms, topk};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};
use serde_json::Value;

// ---------------------------------------------------------------- helpers

/// Case names of a fixture file: the `<case>` prefixes of its tensor names.
fn tensor_cases(f: &TensorFile) -> Vec<String> {
    let set: BTreeSet<String> = f
        .names()
        .iter()
        .filter_map(|n| n.rsplit_once('.').map(|(c, _)| c.to_string()))
        .collect();
    set.into_iter().collect()
}

/// `params[case]` of a fixture file (an empty object when the case has none).
fn case_params(f: &TensorFile, case: &str) -> Value {
    f.params()
        .expect("params")
        .get(case)
        .cloned()
        .unwrap_or(Value::Object(Default::default()))
}

fn f64_param(p: &Value, key: &str) -> f64 {
    p[key]
        .as_f64()
        .unwrap_or_else(|| panic!("param {key} missing in {p}"))
}

fn on(t: &Tensor, device: Device) -> Tensor {
    t.to_device(device).unwrap()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_vec_i64().unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

fn f32_t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec()).unwrap()
}

fn i64_t(v: Vec<i64>) -> Tensor {
    let n = v.len();
    Tensor::from_vec_i64(v, [n]).unwrap()
}

/// Random boxes clustered like detector outputs: `n` boxes around `clusters`
/// centres in an image of `w` x `h` pixels, with jittered sizes; scores in [0, 1).
fn clustered_boxes(seed: u64, n: usize, clusters: usize, w: f64, h: f64) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let centres: Vec<(f64, f64, f64, f64)> = (0..clusters.max(1))
        .map(|_| {
            let (bw, bh) = (r.range(8.0, w / 4.0), r.range(8.0, h / 4.0));
            (r.range(0.0, w), r.range(0.0, h), bw, bh)
        })
        .collect();
    let mut boxes = Vec::with_capacity(4 * n);
    let mut scores = Vec::with_capacity(n);
    for _ in 0..n {
        let (cx, cy, bw, bh) = centres[r.below(centres.len() as u64) as usize];
        let (jx, jy) = (r.normal() * 0.15 * bw, r.normal() * 0.15 * bh);
        let (sw, sh) = (bw * r.range(0.7, 1.3), bh * r.range(0.7, 1.3));
        let (x1, y1) = (cx + jx - sw / 2.0, cy + jy - sh / 2.0);
        boxes.extend_from_slice(&[x1 as f32, y1 as f32, (x1 + sw) as f32, (y1 + sh) as f32]);
        scores.push(r.uniform() as f32);
    }
    (boxes, scores)
}

// ---------------------------------------------------------------- box ops

fn check_box_ops_on(device: Device) {
    let f = fixture("ops/boxes.safetensors");
    let cases = tensor_cases(&f);
    assert!(!cases.is_empty(), "no cases in ops/boxes");
    for case in &cases {
        let p = case_params(&f, case);
        let t = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        match case.as_str() {
            "iou" => {
                let got =
                    boxes::box_iou(&on(&t("boxes1"), device), &on(&t("boxes2"), device)).unwrap();
                assert_close(&format!("{device} iou"), &got, &t("iou"), 1e-5);
            }
            "clip" => {
                let size = (
                    f64_param(&p, "height") as usize,
                    f64_param(&p, "width") as usize,
                );
                let got = boxes::clip_boxes_to_image(&on(&t("boxes"), device), size).unwrap();
                assert_close(&format!("{device} clip"), &got, &t("clipped"), 1e-5);
            }
            "small" => {
                let got =
                    boxes::remove_small_boxes(&on(&t("boxes"), device), f64_param(&p, "min_size"))
                        .unwrap();
                let want = ints(&f.int_tensor(&format!("{case}.keep")).unwrap());
                assert_eq!(got.device(), device);
                assert_eq!(ints(&got), want, "{device} remove_small_boxes");
            }
            other => panic!("ops/boxes: unknown case {other}"),
        }
    }
}

#[test]
fn box_ops_match_torchvision_cpu() {
    check_box_ops_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_ops_match_torchvision_cuda() {
    check_box_ops_on(cuda());
}

/// Hand-computed values and the edge cases: empty sets, zero-width boxes, NaN and
/// infinite coordinates.
fn check_box_edge_cases_on(device: Device) {
    let b = on(
        &f32_t(
            vec![0., 0., 2., 3., 1., 1., 3., 4., 5., 5., 5., 9.],
            &[3, 4],
        ),
        device,
    );
    assert_eq!(floats(&boxes::box_area(&b).unwrap()), vec![6.0, 6.0, 0.0]);
    let iou = floats(&boxes::box_iou(&b, &b).unwrap());
    // [0,0,2,3] and [1,1,3,4] overlap in [1,1,2,3]: 2 / (6 + 6 - 2) = 0.2.
    assert_eq!(iou[0], 1.0);
    assert!(
        (iou[1] - 0.2).abs() < 1e-7 && (iou[3] - 0.2).abs() < 1e-7,
        "{iou:?}"
    );
    assert_eq!(iou[2], 0.0);
    // A zero-width box against itself: 0 / 0 is NaN, as in torchvision.
    assert!(iou[8].is_nan(), "{iou:?}");

    let empty = on(&f32_t(vec![], &[0, 4]), device);
    assert_eq!(boxes::box_iou(&empty, &b).unwrap().dims(), &[0, 3]);
    assert_eq!(boxes::box_iou(&b, &empty).unwrap().dims(), &[3, 0]);
    assert_eq!(boxes::box_area(&empty).unwrap().dims(), &[0]);
    assert_eq!(
        boxes::clip_boxes_to_image(&empty, (10, 10)).unwrap().dims(),
        &[0, 4]
    );
    assert_eq!(
        ints(&boxes::remove_small_boxes(&empty, 1.0).unwrap()),
        Vec::<i64>::new()
    );

    let nan = f32::NAN;
    let odd = on(
        &f32_t(
            vec![
                nan,
                0.,
                4.,
                4.,
                -5.,
                -1.,
                f32::INFINITY,
                20.,
                1.,
                1.,
                1.,
                3.,
                0.,
                0.,
                1.0,
                0.5,
            ],
            &[4, 4],
        ),
        device,
    );
    let clipped = floats(&boxes::clip_boxes_to_image(&odd, (10, 8)).unwrap());
    assert!(clipped[0].is_nan());
    assert_eq!(&clipped[1..8], &[0., 4., 4., 0., 0., 8., 10.]);
    // Widths 4 (NaN x1: NaN >= m is false), inf, 0, 1; heights 4, 21, 2, 0.5.
    assert_eq!(
        ints(&boxes::remove_small_boxes(&odd, 0.5).unwrap()),
        vec![1, 3]
    );
    assert_eq!(
        ints(&boxes::remove_small_boxes(&odd, 0.0).unwrap()),
        vec![1, 2, 3]
    );
    let iou = floats(&boxes::box_iou(&odd, &b).unwrap());
    assert!(
        iou[0..3].iter().all(|v| v.is_nan()),
        "NaN box gives NaN IoU: {iou:?}"
    );
}

#[test]
fn box_edge_cases_cpu() {
    check_box_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_edge_cases_cuda() {
    check_box_edge_cases_on(cuda());
}

#[test]
fn box_ops_f64_match_f32() {
    let (b, _) = clustered_boxes(3, 50, 5, 300.0, 200.0);
    let b32 = f32_t(b, &[50, 4]);
    let b64 = b32.to_dtype(kestrel::DType::F64).unwrap();
    let (i32_, i64_) = (
        boxes::box_iou(&b32, &b32).unwrap(),
        boxes::box_iou(&b64, &b64).unwrap(),
    );
    assert_eq!(i64_.dtype(), kestrel::DType::F64);
    assert_close("iou f64 vs f32", &i32_, &i64_, 1e-5);
    let k64 = boxes::remove_small_boxes(&b64, 30.0).unwrap();
    assert_eq!(
        ints(&k64),
        ints(&boxes::remove_small_boxes(&b32, 30.0).unwrap())
    );
}

#[test]
fn box_ops_reject_bad_input() {
    let bad = f32_t(vec![0.0; 6], &[2, 3]);
    let ok = f32_t(vec![0.0; 8], &[2, 4]);
    for e in [
        boxes::box_area(&bad).unwrap_err(),
        boxes::box_iou(&bad, &ok).unwrap_err(),
        boxes::box_iou(&ok, &bad).unwrap_err(),
        boxes::remove_small_boxes(&bad, 1.0).unwrap_err(),
        boxes::clip_boxes_to_image(&bad, (4, 4)).unwrap_err(),
    ] {
        assert!(matches!(e, kestrel::Error::Shape { .. }), "{e}");
    }
    let idx = i64_t(vec![0, 1]);
    assert!(boxes::box_area(&idx).is_err());
    assert!(boxes::remove_small_boxes(&ok, f64::NAN).is_err());
    let ok64 = ok.to_dtype(kestrel::DType::F64).unwrap();
    assert!(boxes::box_iou(&ok, &ok64).is_err());
}

fn check_box_ops_random_on(device: Device) {
    for seed in 0..3 {
        let (b1, _) = clustered_boxes(seed, 300, 7, 640.0, 480.0);
        let (b2, _) = clustered_boxes(seed + 100, 200, 7, 640.0, 480.0);
        let (t1, t2) = (f32_t(b1, &[300, 4]), f32_t(b2, &[200, 4]));
        let want = boxes::box_iou(&t1, &t2).unwrap();
        let got = boxes::box_iou(&on(&t1, device), &on(&t2, device)).unwrap();
        assert_eq!(floats(&got), floats(&want), "{device} box_iou seed {seed}");
        let want = boxes::clip_boxes_to_image(&t1, (480, 640)).unwrap();
        let got = boxes::clip_boxes_to_image(&on(&t1, device), (480, 640)).unwrap();
        assert_eq!(floats(&got), floats(&want), "{device} clip seed {seed}");
        let want = boxes::remove_small_boxes(&t1, 60.0).unwrap();
        let got = boxes::remove_small_boxes(&on(&t1, device), 60.0).unwrap();
        assert_eq!(ints(&got), ints(&want), "{device} remove_small seed {seed}");
        let want = boxes::box_area(&t2).unwrap();
        let got = boxes::box_area(&on(&t2, device)).unwrap();
        assert_eq!(floats(&got), floats(&want), "{device} area seed {seed}");
    }
}

#[test]
fn box_ops_random_cpu() {
    check_box_ops_random_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_ops_random_cuda_matches_cpu() {
    check_box_ops_random_on(cuda());
}

// ---------------------------------------------------------------- NMS

fn check_nms_fixtures_on(device: Device) {
    let f = fixture("ops/nms.safetensors");
    let params = f.params().unwrap();
    let cases = params.as_object().unwrap();
    assert!(cases.len() >= 7, "ops/nms has {} cases", cases.len());
    for (case, p) in cases {
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let thr = f64_param(p, "iou_threshold");
        let want = ints(&f.int_tensor(&format!("{case}.keep")).unwrap());
        let got = if p["batched"].as_bool().unwrap() {
            let idxs = on(&f.int_tensor(&format!("{case}.idxs")).unwrap(), device);
            nms::batched_nms(&t("boxes"), &t("scores"), &idxs, thr).unwrap()
        } else {
            nms::nms(&t("boxes"), &t("scores"), thr).unwrap()
        };
        assert_eq!(got.device(), device);
        assert_eq!(ints(&got), want, "{device} nms case {case}");
    }
}

#[test]
fn nms_matches_torchvision_cpu() {
    check_nms_fixtures_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn nms_matches_torchvision_cuda() {
    check_nms_fixtures_on(cuda());
}

#[test]
fn nms_reference_matches_torchvision() {
    let f = fixture("ops/nms.safetensors");
    for (case, p) in f.params().unwrap().as_object().unwrap() {
        let t = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let idxs = p["batched"]
            .as_bool()
            .unwrap()
            .then(|| f.int_tensor(&format!("{case}.idxs")).unwrap());
        let got = nms::nms_reference(
            &t("boxes"),
            &t("scores"),
            idxs.as_ref(),
            f64_param(p, "iou_threshold"),
        )
        .unwrap();
        assert_eq!(
            ints(&got),
            ints(&f.int_tensor(&format!("{case}.keep")).unwrap()),
            "reference, case {case}"
        );
    }
}

/// The grid-accelerated CPU path against torchvision's loop on random inputs: sizes
/// on both sides of the parallel threshold, several thresholds, batched and not.
#[test]
fn nms_fast_cpu_equals_reference_loop() {
    for (seed, n, clusters) in [
        (1u64, 500usize, 20usize),
        (2, 3000, 60),
        (3, 20000, 400),
        (4, 18000, 3000),
    ] {
        let (b, s) = clustered_boxes(seed, n, clusters, 1216.0, 800.0);
        let (bt, st) = (f32_t(b, &[n, 4]), f32_t(s, &[n]));
        let cls = i64_t((0..n as i64).map(|i| (i * 7919) % 5).collect());
        // Both CPU indexes: the overlap grid below 0.6, the scale index from 0.6.
        let thrs: &[f64] = if n > 5000 {
            &[0.5, 0.7]
        } else {
            &[0.0, 0.3, 0.5, 0.6, 0.7, 0.95, 1.0, -0.2]
        };
        for &thr in thrs {
            let want = ints(&nms::nms_reference(&bt, &st, None, thr).unwrap());
            assert_eq!(
                ints(&nms::nms(&bt, &st, thr).unwrap()),
                want,
                "n {n} thr {thr}"
            );
            let want = ints(&nms::nms_reference(&bt, &st, Some(&cls), thr).unwrap());
            assert_eq!(
                ints(&nms::batched_nms(&bt, &st, &cls, thr).unwrap()),
                want,
                "batched n {n} thr {thr}"
            );
        }
    }
}

/// Boxes chosen to stress the CPU indexes: sizes over 8 orders of magnitude, extreme
/// aspect ratios, integer boxes whose IoUs hit the thresholds exactly, duplicates.
#[test]
fn nms_fast_cpu_equals_reference_loop_on_adversarial_boxes() {
    let mut r = Rng::new(77);
    let n = 3000;
    let mut b = Vec::with_capacity(4 * n);
    for i in 0..n {
        let (x, y) = (r.range(0.0, 50.0).floor(), r.range(0.0, 50.0).floor());
        let (w, h) = match i % 4 {
            0 => (r.range(1.0, 8.0).floor(), r.range(1.0, 8.0).floor()),
            1 => (
                10f64.powf(r.range(-6.0, 3.0)),
                10f64.powf(r.range(-6.0, 3.0)),
            ),
            2 => (
                10f64.powf(r.range(-1.0, 2.0)),
                10f64.powf(r.range(-1.0, 2.0)) * 50.0,
            ),
            _ => (1e-12, 5.0),
        };
        b.extend_from_slice(&[x as f32, y as f32, (x + w) as f32, (y + h) as f32]);
    }
    let s: Vec<f32> = (0..n)
        .map(|_| (r.uniform() * 16.0).floor() as f32)
        .collect();
    let (bt, st) = (f32_t(b, &[n, 4]), f32_t(s, &[n]));
    for thr in [0.0, 0.25, 0.5, 0.6, 2.0 / 3.0, 0.75, 0.9, 1.0] {
        let want = ints(&nms::nms_reference(&bt, &st, None, thr).unwrap());
        assert_eq!(ints(&nms::nms(&bt, &st, thr).unwrap()), want, "thr {thr}");
    }
}

#[test]
fn nms_f64_matches_f32_on_fixture() {
    let f = fixture("ops/nms.safetensors");
    let t = |n: &str| {
        f.tensor(&format!("clustered_0.7.{n}"))
            .unwrap()
            .to_dtype(kestrel::DType::F64)
            .unwrap()
    };
    let got = nms::nms(&t("boxes"), &t("scores"), 0.7).unwrap();
    assert_eq!(
        ints(&got),
        ints(&f.int_tensor("clustered_0.7.keep").unwrap())
    );
}

/// Hand-worked edge cases. Boxes: 0 = [0,0,10,10], 1 = [1,1,11,11] (IoU with 0:
/// 81 / 119 = 0.68), 2 = [20,20,30,30], 3 = a copy of 0, 4 = [10,0,20,10] (touches 0).
fn check_nms_edge_cases_on(device: Device) {
    let run = |b: Vec<f32>, s: Vec<f32>, thr: f64| {
        let n = s.len();
        let (bt, st) = (on(&f32_t(b, &[n, 4]), device), on(&f32_t(s, &[n]), device));
        let got = ints(&nms::nms(&bt, &st, thr).unwrap());
        if device == Device::Cpu {
            let r = nms::nms_reference(&bt, &st, None, thr).unwrap();
            assert_eq!(got, ints(&r), "fast vs reference loop, thr {thr}");
        }
        got
    };
    let five = vec![
        0., 0., 10., 10., 1., 1., 11., 11., 20., 20., 30., 30., 0., 0., 10., 10., 10., 0., 20., 10.,
    ];
    // No boxes, one box.
    assert_eq!(run(vec![], vec![], 0.5), Vec::<i64>::new());
    assert_eq!(run(vec![0., 0., 1., 1.], vec![0.3], 0.5), vec![0]);
    // All scores equal: visiting order is the input order.
    assert_eq!(run(five.clone(), vec![0.5; 5], 0.5), vec![0, 2, 4]);
    // Threshold 1: an IoU never exceeds 1, nothing is suppressed.
    assert_eq!(run(five.clone(), vec![0.5; 5], 1.0), vec![0, 1, 2, 3, 4]);
    // Threshold 0: any positive overlap suppresses; touching boxes do not overlap.
    assert_eq!(
        run(five.clone(), vec![0.9, 0.1, 0.5, 0.3, 0.2], 0.0),
        vec![0, 2, 4]
    );
    // Equal scores -0.0 and +0.0 keep input order; higher scores first.
    assert_eq!(
        run(five.clone(), vec![0.0, 1.0, -0.0, 0.0, -1.0], 0.9),
        vec![1, 0, 2, 4]
    );
    // A NaN score ranks first (torch's sort); +inf next.
    let s = vec![0.5, f32::NAN, f32::INFINITY, 0.7, f32::NEG_INFINITY];
    assert_eq!(run(five.clone(), s, 0.5), vec![1, 2, 4]);
    // Zero-width boxes: IoU 0/0 = NaN, so identical zero-width boxes are both kept.
    let zw = vec![5., 5., 5., 10., 5., 5., 5., 10., 0., 0., 10., 10.];
    assert_eq!(run(zw, vec![0.9, 0.8, 0.7], 0.5), vec![0, 1, 2]);
    // A NaN coordinate makes a box's IoUs NaN: kept, suppresses nothing.
    let nanb = vec![f32::NAN, 0., 10., 10., 0., 0., 10., 10., 0., 0., 10., 10.];
    assert_eq!(run(nanb, vec![0.9, 0.8, 0.7], 0.5), vec![0, 1]);
    // Infinite sides: an infinite area gives IoU 0 (or NaN) with every box.
    let infb = vec![
        0.,
        0.,
        f32::INFINITY,
        10.,
        0.,
        0.,
        f32::INFINITY,
        10.,
        0.,
        0.,
        10.,
        10.,
        1.,
        1.,
        10.,
        10.,
    ];
    assert_eq!(run(infb, vec![0.9, 0.8, 0.7, 0.6], 0.5), vec![0, 1, 2]);
    // A negative threshold suppresses every finite pair, even disjoint boxes.
    assert_eq!(run(five.clone(), vec![0.5; 5], -0.5), vec![0]);
}

#[test]
fn nms_edge_cases_cpu() {
    check_nms_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn nms_edge_cases_cuda() {
    check_nms_edge_cases_on(cuda());
}

fn check_batched_nms_edge_cases_on(device: Device) {
    // Two identical boxes in different classes are both kept; same class: one.
    let b = on(
        &f32_t(
            vec![0., 0., 10., 10., 0., 0., 10., 10., 0., 0., 10., 10.],
            &[3, 4],
        ),
        device,
    );
    let s = on(&f32_t(vec![0.2, 0.9, 0.5], &[3]), device);
    let c = on(&i64_t(vec![3, 3, 7]), device);
    assert_eq!(
        ints(&nms::batched_nms(&b, &s, &c, 0.5).unwrap()),
        vec![1, 2]
    );
    let c = on(&i64_t(vec![-1, 0, 1]), device);
    assert_eq!(
        ints(&nms::batched_nms(&b, &s, &c, 0.5).unwrap()),
        vec![1, 2, 0]
    );
    let e = on(&f32_t(vec![], &[0, 4]), device);
    let es = on(&f32_t(vec![], &[0]), device);
    let ec = on(&i64_t(vec![]), device);
    assert_eq!(
        ints(&nms::batched_nms(&e, &es, &ec, 0.5).unwrap()),
        Vec::<i64>::new()
    );
    // The device form: keep [N] padded with -1, count [1].
    let out = nms::nms_device(&b, &s, None, 0.5).unwrap();
    assert_eq!((out.keep.device(), out.count.device()), (device, device));
    assert_eq!(ints(&out.count), vec![1]);
    assert_eq!(ints(&out.keep), vec![1, -1, -1]);
    assert_eq!(ints(&out.into_keep().unwrap()), vec![1]);
}

#[test]
fn batched_nms_edge_cases_cpu() {
    check_batched_nms_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn batched_nms_edge_cases_cuda() {
    check_batched_nms_edge_cases_on(cuda());
}

#[test]
fn nms_rejects_bad_input() {
    let b = f32_t(vec![0.0; 8], &[2, 4]);
    let s = f32_t(vec![0.0; 2], &[2]);
    assert!(matches!(
        nms::nms(&b, &f32_t(vec![0.0; 3], &[3]), 0.5),
        Err(kestrel::Error::Shape { .. })
    ));
    assert!(matches!(
        nms::nms(&f32_t(vec![0.0; 6], &[2, 3]), &s, 0.5),
        Err(kestrel::Error::Shape { .. })
    ));
    assert!(matches!(
        nms::nms(&b, &s, f64::NAN),
        Err(kestrel::Error::InvalidArgument { .. })
    ));
    assert!(nms::nms(&b, &s.to_dtype(kestrel::DType::F64).unwrap(), 0.5).is_err());
    assert!(nms::batched_nms(&b, &s, &i64_t(vec![0]), 0.5).is_err());
    assert!(nms::batched_nms(&b, &s, &s, 0.5).is_err());
}

/// CUDA against the CPU on random clustered boxes (sizes across the sort's tile and
/// the walk's block boundaries).
fn check_nms_random_on(device: Device) {
    for (seed, n) in [
        (11u64, 1usize),
        (12, 63),
        (13, 64),
        (14, 65),
        (15, 700),
        (16, 2100),
    ] {
        let (b, mut s) = clustered_boxes(seed, n, 1 + n / 40, 800.0, 600.0);
        // Repeat some scores so that ties are exercised.
        for i in (0..n).step_by(3) {
            s[i] = (s[i] * 8.0).floor() / 8.0;
        }
        let (bt, st) = (f32_t(b, &[n, 4]), f32_t(s, &[n]));
        let cls = i64_t((0..n as i64).map(|i| (i * 31) % 4).collect());
        let thrs: &[f64] = if n <= 100 {
            &[0.0, 0.5, 0.7, 1.0]
        } else {
            &[0.0, 0.7]
        };
        for &thr in thrs {
            let want = ints(&nms::nms(&bt, &st, thr).unwrap());
            let got = ints(&nms::nms(&on(&bt, device), &on(&st, device), thr).unwrap());
            assert_eq!(got, want, "{device} nms n {n} thr {thr}");
            let want = ints(&nms::batched_nms(&bt, &st, &cls, thr).unwrap());
            let got = ints(
                &nms::batched_nms(&on(&bt, device), &on(&st, device), &on(&cls, device), thr)
                    .unwrap(),
            );
            assert_eq!(got, want, "{device} batched n {n} thr {thr}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn nms_random_cuda_matches_cpu() {
    check_nms_random_on(cuda());
}

// ---------------------------------------------------------------- box coder

fn coder_of(p: &Value) -> BoxCoder {
    let w: Vec<f64> = p["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    BoxCoder {
        weights: [w[0], w[1], w[2], w[3]],
        bbox_xform_clip: f64_param(p, "bbox_xform_clip"),
    }
}

fn check_box_coder_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("coder"))
        .collect();
    assert!(cases.len() >= 2, "no coder cases");
    for case in cases {
        let coder = coder_of(&params[case.as_str()]);
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let enc = coder.encode(&t("gt"), &t("reference")).unwrap();
        assert_eq!(enc.device(), device);
        assert_close(
            &format!("{device} {case} encode"),
            &enc,
            &f.tensor(&format!("{case}.encoded")).unwrap(),
            1e-5,
        );
        let dec = coder.decode(&t("deltas"), &t("reference")).unwrap();
        assert_close(
            &format!("{device} {case} decode"),
            &dec,
            &f.tensor(&format!("{case}.decoded")).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn box_coder_matches_torchvision_cpu() {
    check_box_coder_fixtures_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_coder_matches_torchvision_cuda() {
    check_box_coder_fixtures_on(cuda());
}

/// Hand-worked values, the clamp, several code sets per box, empty and NaN inputs.
fn check_box_coder_edge_cases_on(device: Device) {
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let anchor = on(&f32_t(vec![0., 0., 10., 20.], &[1, 4]), device);
    // gt = anchor shifted by (1, 2) and doubled in width: centre (6, 12) vs (5, 10).
    let gt = on(&f32_t(vec![-4., 2., 16., 22.], &[1, 4]), device);
    let enc = floats(&coder.encode(&gt, &anchor).unwrap());
    let want = [1.0, 1.0, 5.0 * 2f32.ln(), 0.0];
    assert!(
        enc.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{enc:?}"
    );
    // Decoding the targets gives the gt back; the second code set hits the clamp:
    // dw = 100 / 5 = 20 -> ln(1000/16), so the width is 10 * 62.5 = 625.
    let codes = on(
        &f32_t(
            vec![enc[0], enc[1], enc[2], enc[3], 0., 0., 100., 0.],
            &[1, 8],
        ),
        device,
    );
    let dec = floats(&coder.decode(&codes, &anchor).unwrap());
    let want = [-4., 2., 16., 22., 5. - 312.5, 0., 5. + 312.5, 20.];
    assert!(
        dec.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3),
        "{dec:?}"
    );
    // Empty inputs.
    let e = on(&f32_t(vec![], &[0, 4]), device);
    assert_eq!(coder.encode(&e, &e).unwrap().dims(), &[0, 4]);
    assert_eq!(coder.decode(&e, &e).unwrap().dims(), &[0, 4]);
    // NaN codes give NaN boxes; a NaN dw is not clamped away.
    let nan = on(&f32_t(vec![0., 0., f32::NAN, 0.], &[1, 4]), device);
    let dec = floats(&coder.decode(&nan, &anchor).unwrap());
    assert!(
        dec[0].is_nan() && dec[2].is_nan() && dec[1] == 0.0 && dec[3] == 20.0,
        "{dec:?}"
    );
    // A zero-width reference encodes to a non-finite target, as in torchvision.
    let flat = on(&f32_t(vec![0., 0., 0., 20.], &[1, 4]), device);
    let enc = floats(&coder.encode(&gt, &flat).unwrap());
    assert!(!enc[0].is_finite() && !enc[2].is_finite(), "{enc:?}");
}

#[test]
fn box_coder_edge_cases_cpu() {
    check_box_coder_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_coder_edge_cases_cuda() {
    check_box_coder_edge_cases_on(cuda());
}

fn check_box_coder_random_on(device: Device) {
    for (seed, weights) in [(21u64, [1.0, 1.0, 1.0, 1.0]), (22, [10.0, 10.0, 5.0, 5.0])] {
        let coder = BoxCoder::new(weights);
        let n = 500;
        let (a, _) = clustered_boxes(seed, n, 10, 1216.0, 800.0);
        let (g, _) = clustered_boxes(seed + 1, n, 10, 1216.0, 800.0);
        let (at, gt) = (f32_t(a, &[n, 4]), f32_t(g, &[n, 4]));
        let want = coder.encode(&gt, &at).unwrap();
        let got = coder.encode(&on(&gt, device), &on(&at, device)).unwrap();
        assert_close(&format!("{device} encode seed {seed}"), &got, &want, 1e-6);
        let codes = f32_t(
            common::randn(seed, n * 8)
                .iter()
                .map(|v| (v * 3.0) as f32)
                .collect(),
            &[n, 8],
        );
        let want = coder.decode(&codes, &at).unwrap();
        let got = coder.decode(&on(&codes, device), &on(&at, device)).unwrap();
        assert_close(&format!("{device} decode seed {seed}"), &got, &want, 1e-6);
    }
}

#[test]
fn box_coder_random_cpu() {
    check_box_coder_random_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn box_coder_random_cuda_matches_cpu() {
    check_box_coder_random_on(cuda());
}

#[test]
fn box_coder_rejects_bad_input() {
    let coder = BoxCoder::new([1.0; 4]);
    let b = f32_t(vec![0.0; 8], &[2, 4]);
    assert!(coder.encode(&b, &f32_t(vec![0.0; 4], &[1, 4])).is_err());
    assert!(coder.decode(&f32_t(vec![0.0; 6], &[2, 3]), &b).is_err());
    assert!(coder.decode(&f32_t(vec![0.0; 8], &[1, 8]), &b).is_err());
    assert!(BoxCoder::new([1.0, 0.0, 1.0, 1.0]).decode(&b, &b).is_err());
    let b64 = b.to_dtype(kestrel::DType::F64).unwrap();
    assert!(coder.decode(&b64, &b).is_err());
    // f64 on the CPU works and agrees with f32.
    let d64 = coder.decode(&b64, &b64).unwrap();
    assert_eq!(d64.dtype(), kestrel::DType::F64);
}

// ---------------------------------------------------------------- anchors

fn usize_pairs(v: &Value) -> Vec<(usize, usize)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn check_anchors_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("anchors"))
        .collect();
    assert!(cases.len() >= 2, "no anchor cases");
    for case in cases {
        let p = &params[case.as_str()];
        let sizes: Vec<Vec<f64>> = p["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| vec![s.as_f64().unwrap()])
            .collect();
        let ratios: Vec<f64> = p["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        let gen = AnchorGenerator::new(sizes.clone(), vec![ratios; sizes.len()]).unwrap();
        let image = usize_pairs(&Value::Array(vec![p["image_size"].clone()]))[0];
        let got = gen
            .anchors(image, &usize_pairs(&p["grids"]), device)
            .unwrap();
        assert_eq!(got.device(), device);
        let want = f.tensor(case).unwrap();
        assert_eq!(got.dims(), want.dims(), "{device} {case}");
        assert_eq!(
            floats(&got),
            floats(&want),
            "{device} {case}: anchors differ"
        );
    }
}

#[test]
fn anchors_match_torchvision_cpu() {
    check_anchors_fixtures_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn anchors_match_torchvision_cuda() {
    check_anchors_fixtures_on(cuda());
}

/// Hand-worked cell anchors and strides, a 1x1 grid, non-divisible image sizes,
/// several sizes per level.
fn check_anchors_edge_cases_on(device: Device) {
    let gen = AnchorGenerator::fpn_default();
    // size 32: ratio 0.5 -> w = 32 / sqrt(0.5) = 45.25, h = 22.63 -> round(+-22.63,
    // +-11.31) = (-23, -11, 23, 11); ratio 1 -> 16; ratio 2 -> (-11, -23, 11, 23).
    assert_eq!(
        gen.cell_anchors()[0],
        vec![
            [-23., -11., 23., 11.],
            [-16., -16., 16., 16.],
            [-11., -23., 11., 23.]
        ]
    );
    assert_eq!(
        AnchorGenerator::strides((800, 1216), &[(13, 19)]).unwrap(),
        vec![(61, 64)]
    );
    let one = AnchorGenerator::new(vec![vec![16.0, 32.0]], vec![vec![1.0]]).unwrap();
    let a = floats(&one.anchors((7, 9), &[(1, 1)], device).unwrap());
    assert_eq!(a, vec![-8., -8., 8., 8., -16., -16., 16., 16.]);
    // Grid 2 x 3 on a 7 x 10 image: strides (3, 3); second row starts at y = 3.
    let a = one.anchors((7, 10), &[(2, 3)], device).unwrap();
    assert_eq!(a.dims(), &[12, 4]);
    let a = floats(&a);
    assert_eq!(
        &a[4 * 6..4 * 7],
        &[-8., -5., 8., 11.],
        "row 1, column 0, size 16"
    );
    assert_eq!(
        &a[4 * 5..4 * 6],
        &[-10., -16., 22., 16.],
        "row 0, column 2, size 32"
    );
    assert!(one.anchors((7, 10), &[(0, 3)], device).is_err());
    assert!(one.anchors((7, 10), &[(1, 1), (1, 1)], device).is_err());
}

#[test]
fn anchors_edge_cases_cpu() {
    check_anchors_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn anchors_edge_cases_cuda() {
    check_anchors_edge_cases_on(cuda());
}

#[test]
fn anchor_generator_rejects_bad_config() {
    assert!(AnchorGenerator::new(vec![vec![32.0]], vec![]).is_err());
    assert!(AnchorGenerator::new(vec![vec![-32.0]], vec![vec![1.0]]).is_err());
    assert!(AnchorGenerator::new(vec![vec![32.0]], vec![vec![f64::NAN]]).is_err());
    assert!(AnchorGenerator::new(vec![vec![]], vec![vec![1.0]]).is_err());
    assert_eq!(
        AnchorGenerator::fpn_default().num_anchors_per_location(),
        vec![3; 5]
    );
}

// ---------------------------------------------------------------- matcher

fn matcher_of(p: &Value) -> Matcher {
    Matcher::new(
        f64_param(p, "high"),
        f64_param(p, "low"),
        p["allow_low_quality_matches"].as_bool().unwrap(),
    )
    .unwrap()
}

fn check_matcher_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("matcher"))
        .collect();
    assert!(cases.len() >= 2, "no matcher cases");
    for case in cases {
        let m = matcher_of(&params[case.as_str()]);
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let want = ints(&f.int_tensor(&format!("{case}.matches")).unwrap());
        let got = m.matches(&t("iou")).unwrap();
        assert_eq!(got.device(), device);
        assert_eq!(ints(&got), want, "{device} {case} on the fixture IoU");
        // The whole path: our IoU of gt and proposals, then the matcher.
        let iou = boxes::box_iou(&t("gt"), &t("proposals")).unwrap();
        assert_close(
            &format!("{device} {case} iou"),
            &iou,
            &f.tensor(&format!("{case}.iou")).unwrap(),
            1e-6,
        );
        assert_eq!(
            ints(&m.matches(&iou).unwrap()),
            want,
            "{device} {case} on our IoU"
        );
    }
}

#[test]
fn matcher_matches_torchvision_cpu() {
    check_matcher_fixtures_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn matcher_matches_torchvision_cuda() {
    check_matcher_fixtures_on(cuda());
}

/// Hand-worked matrices: thresholds, low-quality ties (restoring each anchor's own
/// best gt), duplicate gts, NaN, a gt without overlaps, empty inputs.
fn check_matcher_edge_cases_on(device: Device) {
    let run = |m: &Matcher, v: Vec<f32>, g: usize| {
        let a = v.len().checked_div(g).unwrap_or(0);
        ints(&m.matches(&on(&f32_t(v, &[g, a]), device)).unwrap())
    };
    let rpn = Matcher::new(0.7, 0.3, true).unwrap();
    let plain = Matcher::new(0.7, 0.3, false).unwrap();
    let iou = vec![0.9, 0.5, 0.65, 0.2, 0.3, 0.6, 0.6, 0.1];
    assert_eq!(run(&plain, iou.clone(), 2), vec![0, -2, -2, -1]);
    // gt 1's maximum 0.6 is reached by anchors 1 and 2: anchor 1's best gt is 1,
    // anchor 2's best gt is 0 (0.65), and that is what it gets back.
    assert_eq!(run(&rpn, iou, 2), vec![0, 1, 0, -1]);
    // Duplicate gts: the first one wins.
    assert_eq!(run(&plain, vec![0.8, 0.1, 0.8, 0.1], 2), vec![0, -1]);
    // A NaN best IoU keeps its gt index; a NaN row maximum restores nothing.
    let nan = f32::NAN;
    assert_eq!(run(&plain, vec![0.9, 0.1, nan, 0.2], 2), vec![1, -1]);
    assert_eq!(run(&rpn, vec![0.9, 0.1, nan, 0.2], 2), vec![1, -1]);
    // A gt with no overlap has maximum 0: every anchor with IoU 0 to it is restored
    // to its own best gt (torchvision's rule, ties included).
    assert_eq!(
        run(&rpn, vec![0.8, 0.0, 0.0, 0.0, 0.0, 0.0], 2),
        vec![0, 0, 0]
    );
    // Thresholds are compared in f32: 0.7f32 < 0.7 in f64, but it is a match here.
    assert_eq!(run(&plain, vec![0.7], 1), vec![0]);
    // Equal thresholds: nothing is "between".
    let head = Matcher::new(0.5, 0.5, false).unwrap();
    assert_eq!(run(&head, vec![0.5, 0.49, 0.51], 1), vec![0, -1, 0]);
    // No gts: every anchor is below the low threshold. No anchors: empty.
    assert_eq!(run(&rpn, vec![], 0), Vec::<i64>::new());
    let none = on(&f32_t(vec![], &[0, 3]), device);
    assert_eq!(ints(&rpn.matches(&none).unwrap()), vec![-1, -1, -1]);
    let no_anchors = on(&f32_t(vec![], &[2, 0]), device);
    assert_eq!(ints(&rpn.matches(&no_anchors).unwrap()), Vec::<i64>::new());
}

#[test]
fn matcher_edge_cases_cpu() {
    check_matcher_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn matcher_edge_cases_cuda() {
    check_matcher_edge_cases_on(cuda());
}

fn check_matcher_random_on(device: Device) {
    for (seed, g) in [(31u64, 1usize), (32, 7), (33, 40)] {
        let n = 2000;
        let (a, _) = clustered_boxes(seed, n, 30, 640.0, 480.0);
        let (gt, _) = clustered_boxes(seed + 7, g, 30, 640.0, 480.0);
        let iou = boxes::box_iou(&f32_t(gt, &[g, 4]), &f32_t(a, &[n, 4])).unwrap();
        for m in [
            Matcher::new(0.7, 0.3, true).unwrap(),
            Matcher::new(0.5, 0.5, false).unwrap(),
        ] {
            let want = ints(&m.matches(&iou).unwrap());
            assert_eq!(
                ints(&m.matches(&on(&iou, device)).unwrap()),
                want,
                "{device} seed {seed} {m:?}"
            );
        }
    }
}

#[test]
fn matcher_random_cpu() {
    check_matcher_random_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn matcher_random_cuda_matches_cpu() {
    check_matcher_random_on(cuda());
}

#[test]
fn matcher_rejects_bad_input() {
    assert!(Matcher::new(0.3, 0.7, true).is_err());
    assert!(Matcher::new(f64::NAN, 0.3, true).is_err());
    let m = Matcher::new(0.7, 0.3, true).unwrap();
    assert!(m.matches(&f32_t(vec![0.0; 4], &[4])).is_err());
    assert!(m
        .matches(&i64_t(vec![0; 4]).reshape_detached([2, 2]).unwrap())
        .is_err());
    let f64_iou = f32_t(vec![0.9, 0.1], &[1, 2])
        .to_dtype(kestrel::DType::F64)
        .unwrap();
    assert_eq!(ints(&m.matches(&f64_iou).unwrap()), vec![0, -1]);
}

// ---------------------------------------------------------------- top-k

fn check_topk_fixture_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let p = case_params(&f, "topk");
    assert_eq!(
        p["dim"].as_i64(),
        Some(1),
        "topk fixture is over the last dim"
    );
    let k = p["k"].as_u64().unwrap() as usize;
    let (v, i) = topk::topk(&on(&f.tensor("topk.input").unwrap(), device), k).unwrap();
    assert_eq!(i.device(), device);
    assert_eq!(
        ints(&i),
        ints(&f.int_tensor("topk.indices").unwrap()),
        "{device} topk indices"
    );
    assert_close(
        &format!("{device} topk values"),
        &v,
        &f.tensor("topk.values").unwrap(),
        1e-6,
    );
}

#[test]
fn topk_matches_torch_cpu() {
    check_topk_fixture_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn topk_matches_torch_cuda() {
    check_topk_fixture_on(cuda());
}

/// Top-k by a full sort (the obvious definition): descending, NaN first, ties by index.
fn topk_by_sort(v: &[f32], k: usize) -> Vec<i64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        let key = |x: f32| if x.is_nan() { f32::INFINITY } else { x };
        let (na, nb) = (v[a].is_nan(), v[b].is_nan());
        nb.cmp(&na)
            .then(key(v[b]).partial_cmp(&key(v[a])).unwrap())
            .then(a.cmp(&b))
    });
    idx.into_iter().take(k).map(|i| i as i64).collect()
}

/// Per-level top-k on random rows: the sampled-threshold path, the exact radix path
/// (many equal values) and short levels, against a full sort.
fn check_topk_levels_on(device: Device) {
    let levels = [20000usize, 5000, 1300, 300, 77];
    let a: usize = levels.iter().sum();
    let k = 1000;
    let kinds = [
        (41u64, "random"),
        (42, "ties"),
        (43, "nan"),
        (44, "constant"),
        (45, "unsampled"),
    ];
    for (seed, kind) in kinds {
        let mut v: Vec<f32> = common::randn(seed, 2 * a)
            .iter()
            .map(|x| (x * 4.0) as f32)
            .collect();
        match kind {
            "ties" => v.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0),
            "nan" => v.iter_mut().step_by(97).for_each(|x| *x = f32::NAN),
            "constant" => v.iter_mut().for_each(|x| *x = 0.25),
            // The CUDA kernel samples every (len / 2048)-th element (9th here): make
            // those the smallest so that its threshold fails and the exact select runs.
            "unsampled" => v.iter_mut().step_by(9).for_each(|x| *x = -10.0),
            _ => {}
        }
        let (vals, idx) =
            topk::topk_levels(&on(&f32_t(v.clone(), &[2, a]), device), &levels, k).unwrap();
        let out_row: usize = levels.iter().map(|&l| l.min(k)).sum();
        assert_eq!(idx.dims(), &[2, out_row]);
        let (idx, vals) = (ints(&idx), floats(&vals));
        let mut pos = 0;
        for r in 0..2 {
            let mut off = 0;
            for &l in &levels {
                let row = &v[r * a + off..r * a + off + l];
                let want: Vec<i64> = topk_by_sort(row, k)
                    .into_iter()
                    .map(|i| i + off as i64)
                    .collect();
                let n = want.len();
                assert_eq!(
                    &idx[pos..pos + n],
                    &want[..],
                    "{device} {kind} row {r} level of {l}"
                );
                for (j, &c) in want.iter().enumerate() {
                    let x = v[r * a + c as usize];
                    assert!(vals[pos + j] == x || (x.is_nan() && vals[pos + j].is_nan()));
                }
                pos += n;
                off += l;
            }
        }
    }
}

#[test]
fn topk_levels_cpu() {
    check_topk_levels_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn topk_levels_cuda() {
    check_topk_levels_on(cuda());
}

fn check_topk_edge_cases_on(device: Device) {
    let run = |v: Vec<f32>, k: usize| {
        let n = v.len();
        let (vals, idx) = topk::topk(&on(&f32_t(v, &[1, n]), device), k).unwrap();
        (floats(&vals), ints(&idx))
    };
    // All values equal: the first k indices.
    assert_eq!(run(vec![0.5; 9], 4).1, vec![0, 1, 2, 3]);
    // NaN ranks first, then +inf; -0.0 ties with +0.0 by index.
    let (v, i) = run(
        vec![0.0, f32::NAN, -0.0, f32::INFINITY, 1.0, f32::NEG_INFINITY],
        6,
    );
    assert_eq!(i, vec![1, 3, 4, 0, 2, 5]);
    assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[5] == f32::NEG_INFINITY);
    // k = 0, k = C, one element.
    assert_eq!(run(vec![1.0, 2.0], 0).1, Vec::<i64>::new());
    assert_eq!(
        run(vec![1.0, 3.0, 2.0], 3),
        (vec![3.0, 2.0, 1.0], vec![1, 2, 0])
    );
    assert_eq!(run(vec![7.0], 1).1, vec![0]);
    // Levels shorter than k keep everything; an empty level contributes nothing.
    let x = on(&f32_t(vec![1.0, 5.0, 3.0, 2.0, 9.0], &[1, 5]), device);
    let (_, i) = topk::topk_levels(&x, &[2, 0, 3], 2).unwrap();
    assert_eq!(ints(&i), vec![1, 0, 4, 2]);
    // No rows.
    let (_, i) = topk::topk(&on(&f32_t(vec![], &[0, 5]), device), 2).unwrap();
    assert_eq!(i.dims(), &[0, 2]);
}

#[test]
fn topk_edge_cases_cpu() {
    check_topk_edge_cases_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn topk_edge_cases_cuda() {
    check_topk_edge_cases_on(cuda());
}

#[test]
fn topk_rejects_bad_input() {
    let x = f32_t(vec![0.0; 6], &[2, 3]);
    assert!(topk::topk(&x, 4).is_err(), "k larger than the row");
    assert!(topk::topk(&f32_t(vec![0.0; 6], &[6]), 1).is_err());
    assert!(
        topk::topk_levels(&x, &[1, 1], 1).is_err(),
        "levels do not sum to the row"
    );
    assert!(topk::topk(&i64_t(vec![0; 6]).reshape_detached([2, 3]).unwrap(), 1).is_err());
    let x64 = x.to_dtype(kestrel::DType::F64).unwrap();
    assert_eq!(topk::topk(&x64, 2).unwrap().0.dtype(), kestrel::DType::F64);
}

// ---------------------------------------------------------------- sampler

fn sampler_labels() -> Vec<i64> {
    // 10 positives (labels 1..3), 30 negatives, 10 ignored, interleaved.
    (0..50)
        .map(|i| match i % 5 {
            0 => 1 + (i / 5) % 3,
            1..=3 => 0,
            _ => -1,
        })
        .collect()
}

#[test]
fn sampler_takes_every_candidate_when_the_batch_allows() {
    let labels = sampler_labels();
    let s = BalancedPositiveNegativeSampler::new(1_000_000, 0.5).unwrap();
    let mut rng = Rng::new(5);
    let got = s.sample(&i64_t(labels.clone()), &mut rng).unwrap();
    let pos: Vec<i64> = (0..50).filter(|&i| labels[i as usize] >= 1).collect();
    let neg: Vec<i64> = (0..50).filter(|&i| labels[i as usize] == 0).collect();
    assert_eq!(
        got,
        Sampled {
            positive: pos,
            negative: neg
        }
    );
    assert_eq!(
        rng,
        Rng::new(5),
        "taking everything must not draw random numbers"
    );
}

#[test]
fn sampler_is_balanced_reproducible_and_valid() {
    let labels = sampler_labels();
    let s = BalancedPositiveNegativeSampler::new(16, 0.25).unwrap();
    let draw = |seed| s.sample_labels(&labels, &mut Rng::new(seed)).unwrap();
    let a = draw(1);
    assert_eq!(a, draw(1), "same seed, same sample");
    assert_ne!(a, draw(2), "another seed, another sample");
    // floor(16 * 0.25) = 4 positives, 12 negatives; ascending, unique, right labels.
    assert_eq!((a.positive.len(), a.negative.len()), (4, 12));
    for (list, ok) in [
        (&a.positive, &(|l: i64| l >= 1) as &dyn Fn(i64) -> bool),
        (&a.negative, &|l| l == 0),
    ] {
        assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        assert!(list.iter().all(|&i| ok(labels[i as usize])), "{list:?}");
    }
    // Few positives: negatives fill the batch.
    let s = BalancedPositiveNegativeSampler::new(30, 0.5).unwrap();
    let b = s.sample_labels(&labels, &mut Rng::new(3)).unwrap();
    assert_eq!((b.positive.len(), b.negative.len()), (10, 20));
    // Every positive is about equally likely (4 of 10 per draw).
    let s = BalancedPositiveNegativeSampler::new(8, 0.5).unwrap();
    let mut counts = [0usize; 50];
    let mut rng = Rng::new(9);
    for _ in 0..4000 {
        for i in s.sample_labels(&labels, &mut rng).unwrap().positive {
            counts[i as usize] += 1;
        }
    }
    for i in (0..50).filter(|&i| labels[i] >= 1) {
        assert!(
            (1400..=1800).contains(&counts[i]),
            "positive {i} drawn {} times of ~1600",
            counts[i]
        );
    }
}

/// Labels on the device sample exactly as on the host.
fn check_sampler_on(device: Device) {
    let labels = i64_t(sampler_labels());
    let s = BalancedPositiveNegativeSampler::new(16, 0.25).unwrap();
    let want = s.sample(&labels, &mut Rng::new(4)).unwrap();
    assert_eq!(
        s.sample(&on(&labels, device), &mut Rng::new(4)).unwrap(),
        want,
        "{device}"
    );
}

#[test]
fn sampler_labels_on_any_device_cpu() {
    check_sampler_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sampler_labels_on_any_device_cuda() {
    check_sampler_on(cuda());
}

#[test]
fn sampler_edge_cases() {
    let s = BalancedPositiveNegativeSampler::new(4, 0.5).unwrap();
    let mut rng = Rng::new(0);
    let empty = Sampled {
        positive: vec![],
        negative: vec![],
    };
    assert_eq!(s.sample_labels(&[], &mut rng).unwrap(), empty);
    assert_eq!(s.sample_labels(&[-1, -1, -2], &mut rng).unwrap(), empty);
    assert_eq!(
        s.sample_labels(&[0, 0], &mut rng).unwrap().negative,
        vec![0, 1]
    );
    let none = BalancedPositiveNegativeSampler::new(0, 0.5).unwrap();
    assert_eq!(
        none.sample_labels(&sampler_labels(), &mut rng).unwrap(),
        empty
    );
    assert!(BalancedPositiveNegativeSampler::new(4, 1.5).is_err());
    assert!(BalancedPositiveNegativeSampler::new(4, f64::NAN).is_err());
    assert!(s.sample(&f32_t(vec![1.0], &[1]), &mut rng).is_err());
    let batch = s
        .sample_batch(&[i64_t(vec![1, 0]), i64_t(vec![0, 1])], &mut rng)
        .unwrap();
    assert_eq!(
        batch[1],
        Sampled {
            positive: vec![1],
            negative: vec![0]
        }
    );
}

// ---------------------------------------------------------------- device check list

/// A named check to run on a given device.
pub type DeviceCheck = (&'static str, fn(Device));

/// Every `check_*_on` function, for runners that bring their own device (an
/// emulated CUDA device runs this list).
pub fn device_checks() -> Vec<DeviceCheck> {
    vec![
        ("box_ops", check_box_ops_on),
        ("box_edge_cases", check_box_edge_cases_on),
        ("box_ops_random", check_box_ops_random_on),
        ("nms_edge_cases", check_nms_edge_cases_on),
        ("batched_nms_edge_cases", check_batched_nms_edge_cases_on),
        ("nms_random", check_nms_random_on),
        ("nms_fixtures", check_nms_fixtures_on),
        ("box_coder", check_box_coder_fixtures_on),
        ("box_coder_edge_cases", check_box_coder_edge_cases_on),
        ("box_coder_random", check_box_coder_random_on),
        ("anchors", check_anchors_fixtures_on),
        ("anchors_edge_cases", check_anchors_edge_cases_on),
        ("matcher", check_matcher_fixtures_on),
        ("matcher_edge_cases", check_matcher_edge_cases_on),
        ("matcher_random", check_matcher_random_on),
        ("topk", check_topk_fixture_on),
        ("topk_levels", check_topk_levels_on),
        ("topk_edge_cases", check_topk_edge_cases_on),
        ("sampler", check_sampler_on),
    ]
}

// The CUDA paths above, on the emulated device (kernels run on the host).

#[test]
fn box_ops_match_torchvision_emulated() {
    check_box_ops_on(common::emulated());
}

#[test]
fn box_edge_cases_emulated() {
    check_box_edge_cases_on(common::emulated());
}

#[test]
fn box_ops_random_emulated_matches_cpu() {
    check_box_ops_random_on(common::emulated());
}

#[test]
fn nms_matches_torchvision_emulated() {
    check_nms_fixtures_on(common::emulated());
}

#[test]
fn nms_edge_cases_emulated() {
    check_nms_edge_cases_on(common::emulated());
}

#[test]
fn batched_nms_edge_cases_emulated() {
    check_batched_nms_edge_cases_on(common::emulated());
}

#[test]
fn nms_random_emulated_matches_cpu() {
    check_nms_random_on(common::emulated());
}

#[test]
fn box_coder_matches_torchvision_emulated() {
    check_box_coder_fixtures_on(common::emulated());
}

#[test]
fn box_coder_edge_cases_emulated() {
    check_box_coder_edge_cases_on(common::emulated());
}

#[test]
fn box_coder_random_emulated_matches_cpu() {
    check_box_coder_random_on(common::emulated());
}

#[test]
fn anchors_match_torchvision_emulated() {
    check_anchors_fixtures_on(common::emulated());
}

#[test]
fn anchors_edge_cases_emulated() {
    check_anchors_edge_cases_on(common::emulated());
}

#[test]
fn matcher_matches_torchvision_emulated() {
    check_matcher_fixtures_on(common::emulated());
}

#[test]
fn matcher_edge_cases_emulated() {
    check_matcher_edge_cases_on(common::emulated());
}

#[test]
fn matcher_random_emulated_matches_cpu() {
    check_matcher_random_on(common::emulated());
}

#[test]
fn topk_matches_torch_emulated() {
    check_topk_fixture_on(common::emulated());
}

#[test]
fn topk_levels_emulated() {
    check_topk_levels_on(common::emulated());
}

#[test]
fn topk_edge_cases_emulated() {
    check_topk_edge_cases_on(common::emulated());
}

#[test]
fn sampler_labels_on_any_device_emulated() {
    check_sampler_on(common::emulated());
}
