//! NMS and batched NMS (kernels/nms.cu) against torchvision (fixture ops/nms), a plain
//! reference loop, edge cases and random clustered boxes, on every device.

mod common;

use common::*;
use kestrel::ops::nms;
use kestrel::rng::Rng;
use kestrel::Device;

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

crate::device_tests! {
    nms_matches_torchvision => check_nms_fixtures_on;
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

crate::device_tests! {
    nms_edge_cases => check_nms_edge_cases_on;
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

crate::device_tests! {
    batched_nms_edge_cases => check_batched_nms_edge_cases_on;
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

crate::device_tests! {
    nms_random(emulated, cuda) => check_nms_random_on;
}
